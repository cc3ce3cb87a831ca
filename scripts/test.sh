#!/usr/bin/env bash
# Command two: set up, then lint, type-check and run every test (and the drill).
set -euo pipefail
cd "$(dirname "$0")/.."
GLASSROOM_SETUP_TIERS=1 bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
