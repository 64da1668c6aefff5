#!/usr/bin/env bash
# Builds the side venv in which sentence-transformers' own ONNX exports run (bench/embeddings_compare.py).
#
# sentence-transformers exports through optimum-onnx, and optimum-onnx 0.1.0 (the newest) requires
# transformers<4.58, while compressor runs on transformers 5: the peers live in a venv of their own.
# torch is pinned to 2.13.0 and installed first and alone (an unpinned torch pulls a multi-gigabyte CUDA
# build); onnxruntime is the main venv's version, so both sides run the same kernels.
#
#   bash bench/peers/setup.sh [VENV]     # default: ~/.cache/compressor-bench/st-venv (or under $XDG_CACHE_HOME)
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/peers/venv.sh
VENV=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/compressor-bench/st-venv}
ORT=$(.venv/bin/python -c "from importlib.metadata import version; print(version('onnxruntime'))")
WANTED="torch==2.13.0 transformers==4.57.6 optimum-onnx==0.1.0 onnxruntime==$ORT sentence-transformers<6"
venv_ready "$VENV" "$WANTED"
echo "building the sentence-transformers side venv in $VENV (once) ..." >&2
venv_create "$VENV"
"${PIP[@]}" "torch==2.13.0" >&2
# sentence-transformers 6 requires transformers 5; 5.x is the newest line that runs beside optimum-onnx
"${PIP[@]}" "torch==2.13.0" "transformers==4.57.6" "optimum-onnx==0.1.0" "onnxruntime==$ORT" \
  "sentence-transformers<6" >&2
venv_done "$VENV" "$WANTED"
