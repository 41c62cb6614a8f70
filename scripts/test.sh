#!/usr/bin/env bash
# Lint, type-check and test: bash scripts/test.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

echo "== ruff";  ruff check .
echo "== mypy";  mypy
echo "== pytest"; pytest -q "$@"
