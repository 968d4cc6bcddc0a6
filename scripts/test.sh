#!/usr/bin/env bash
# Set up (with test tools and Chromium), then lint, type-check and run every test (both tiers:
# unit and integration, slow ones too). Extra arguments go to pytest.
#
#   bash scripts/test.sh            # everything (CI)
#   bash scripts/test.sh --fast     # ruff, mypy and the unit tier only (pytest -m unit), no setup
#
# The tiers are set in tests/conftest.py; README "Tests" has their contents and times.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [[ "${1:-}" == "--fast" ]]; then
    fast=1
    shift
fi
if [[ $fast == 0 ]]; then
    bash scripts/setup.sh --test
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
if [[ $fast == 1 ]]; then
    .venv/bin/python -m pytest -q -m unit "$@"
else
    .venv/bin/python -m pytest -q "$@"
fi
