#!/usr/bin/env bash
# Lint, type-check, test and build the docs strictly: bash scripts/test.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

echo "== ruff";  ruff check .
echo "== mypy";  mypy
echo "== pytest"; pytest -q "$@"
echo "== docs";  NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
