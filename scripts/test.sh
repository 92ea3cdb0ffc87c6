#!/usr/bin/env bash
# README command (2): set up exactly as quickstart does, then lint and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check dymoe_gguf converters tests scripts
# A stock build of the same sdist, if one is cached (never built here: it would double the set-up
# time), lets tests/native compare the patched build with nothing registered against stock, bit for bit.
STOCK_WHEEL="$(bash scripts/build_llama_cpp.sh --stock --cached-only .venv/bin/python 2>/dev/null || true)"
if [ -n "$STOCK_WHEEL" ] && [ -z "${DYMOE_STOCK_LIB_DIR:-}" ]; then
    rm -rf .venv/stock-llama && mkdir -p .venv/stock-llama
    .venv/bin/python -m zipfile -e "$STOCK_WHEEL" .venv/stock-llama
    export DYMOE_STOCK_LIB_DIR="$PWD/.venv/stock-llama/llama_cpp/lib"
fi
.venv/bin/python -m pytest -q "$@"
