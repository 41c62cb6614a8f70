#!/usr/bin/env bash
# Lint, type-check, test and build the docs strictly: bash scripts/test.sh [pytest args...]
# The fast tier (lint and in-process tests, a few minutes): bash scripts/test.sh --fast [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_venv.sh"
# The docs' recipe runs train on the real Fashion-MNIST, as a user's would.
source "$here/_data.sh"

if [ "${1:-}" = "--fast" ]; then
    # The fast tier, for iteration: lint and the tests that run in this process (no worker is started).
    shift
    echo "== ruff";  ruff check .
    echo "== pytest (fast tier: in-process tests only)"; LIGHTNING_CMP_FAST=1 pytest -q "$@"
    exit 0
fi

echo "== ruff";  ruff check .
echo "== mypy";  mypy
echo "== pytest"; pytest -q --durations=25 "$@"  # the slowest tests listed: what to merge when the suite grows
echo "== docs";  NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
