#!/usr/bin/env bash
# README command (2): set up exactly as quickstart does, then lint and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check dymoe_gguf converters tests scripts
# cmake builds of the vendored llama.cpp the tests compare against (scripts/build_llama_native.sh,
# cached under ~/.cache/dymoe-gguf/native; cold on 2 cores: see README "Quality"): the patched build's
# llama-perplexity and our C test programs, and a stock ggml for the patched-vs-stock comparison.
if [ "$(uname -m)" = x86_64 ]; then
    bash scripts/build_llama_native.sh --variant x86-native --target llama-perplexity \
        --driver tests/native/c/views_test.c --driver tests/native/c/forward.c >/dev/null
    bash scripts/build_llama_native.sh --variant x86-native --stock --target ggml-cpu --target ggml >/dev/null
    export DYMOE_REQUIRE_NATIVE=1
fi
.venv/bin/python -m pytest -q "$@"
