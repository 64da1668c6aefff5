#!/usr/bin/env bash
# Builds the side venv in which llama.cpp runs as a peer row of bench/llm_compare.py.
#
# llama-cpp-python is built from source (about 12 minutes on 2 cores; CPU only, native kernels for this
# machine, as llama.cpp's own build does). The venv also gets the gguf package of the same llama.cpp source
# tree, whose convert_hf_to_gguf.py turns the fine-tuned model into an f32 GGUF; that conversion runs in the
# main venv (it needs torch and transformers, which the main venv has), with VENV/llama.cpp/gguf-py and
# VENV/convert-extras (sentencepiece, which the converter imports for Llama models) on its PYTHONPATH, so the
# main venv itself is not changed.
#
#   bash bench/peers/llama_cpp_setup.sh [VENV]   # default: ~/.cache/compressor-bench/llama-cpp-venv
# Prints the venv's python; its llama.cpp source tree (convert_hf_to_gguf.py) is at VENV/llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/peers/venv.sh
VENV=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/compressor-bench/llama-cpp-venv}
WANTED="llama-cpp-python==0.3.36 numpy<3 sentencepiece"
venv_ready "$VENV" "$WANTED"
echo "building the llama.cpp side venv in $VENV (once, about 12 minutes) ..." >&2
venv_create "$VENV"
"${PIP[@]}" "numpy<3" >&2
"${PIP[@]}" --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==0.3.36" >&2
# the converter and its gguf package, from the same sdist
rm -rf "$VENV/src" "$VENV/llama.cpp" && mkdir -p "$VENV/src"
"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$VENV/src" >&2
tar xzf "$VENV"/src/llama_cpp_python-0.3.36.tar.gz -C "$VENV/src"
mv "$VENV/src/llama_cpp_python-0.3.36/vendor/llama.cpp" "$VENV/llama.cpp"
rm -rf "$VENV/src"
"$VENV/bin/python" -m pip install -q --target "$VENV/convert-extras" sentencepiece >&2
venv_done "$VENV" "$WANTED"
