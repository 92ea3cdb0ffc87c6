#!/usr/bin/env bash
# Set up a fresh clone: .venv/ in the project root, llama-cpp-python 0.3.36 built from its sdist with
# patches/ applied (the wheel is cached in ~/.cache/dymoe-gguf, so a second run takes seconds), and
# dymoe-gguf itself (editable) with its test, bench and server extras. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ -n "$(ls patches/*.patch 2>/dev/null)" ] && [ "${DYMOE_STOCK:-0}" != 1 ]; then
    bash scripts/build_llama_cpp.sh .venv/bin/python >/dev/null
else
    bash scripts/build_llama_cpp.sh --stock .venv/bin/python >/dev/null
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,bench,server]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import dymoe_gguf, llama_cpp, llama_cpp.server.app" || { echo "error: set-up failed: dymoe_gguf, llama_cpp or its server does not import" >&2; exit 1; }
