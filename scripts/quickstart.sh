#!/usr/bin/env bash
# README command (1): set up, convert the embedded default model into a bundle, generate text with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
mkdir -p build
MODEL=models/tiny-moe
if [ ! -f "$MODEL/config.json" ]; then
    # No trained model in this checkout: make a small synthetic one (random weights) to show the flow.
    MODEL=build/synth-moe
    .venv/bin/dymoe-gguf synth "$MODEL" --force
fi
.venv/bin/dymoe-gguf convert "$MODEL" -o build/default.dymoe --force -q
.venv/bin/dymoe-gguf inspect build/default.dymoe
.venv/bin/dymoe-gguf calibrate build/default.dymoe --text data/calibration.txt --ctx 256 --chunks 32
# generate under a memory budget below the Q4_K experts (7 MiB): the controller decides tiers and pages experts
.venv/bin/dymoe-gguf run build/default.dymoe -p "${PROMPT:-The history of the city}" -n "${N_TOKENS:-48}" --budget "${BUDGET:-4MiB}"
