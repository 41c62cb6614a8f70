#!/usr/bin/env bash
# Lint, type-check, test and build the docs strictly: bash scripts/test.sh [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_venv.sh"
# The docs' recipe runs train on the real Fashion-MNIST, as a user's would.
source "$here/_data.sh"

echo "== ruff";  ruff check .
echo "== mypy";  mypy
echo "== pytest"; pytest -q "$@"
echo "== docs";  NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
