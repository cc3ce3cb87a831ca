#!/usr/bin/env bash
# Command one: set up, then run the demo agent task on the default backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/glassroom demo
