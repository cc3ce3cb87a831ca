#!/usr/bin/env bash
# Command two: set up, then lint, type-check and run every test (and the drill).
set -euo pipefail
cd "$(dirname "$0")/.."
GLASSROOM_SETUP_TIERS=1 bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# --durations: the slowest tests are named in every run, to keep CI within its budget.
.venv/bin/python -m pytest -q --durations=15 "$@"
