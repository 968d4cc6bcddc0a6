#!/usr/bin/env bash
# The main job: set up, then read the built-in example through the backward lens on the default
# model (SmolLM2-135M): prints the per-layer table, writes out/eiffel.{png,html,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/backward-lens explain "$@" --png out/eiffel.png --html out/eiffel.html --json out/eiffel.json
