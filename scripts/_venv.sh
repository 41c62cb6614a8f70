# Sourced by the other scripts: create or reuse ./.venv and activate it.
# Installs `-e ".[dev]"` under constraints/dev.txt only when pyproject.toml or the constraints changed
# (a hash stamp in .venv/), so re-runs take a second.
# shellcheck shell=bash

_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_repo_root"

_python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[venv] creating .venv with $($_python --version 2>&1)"
    "$_python" -m venv .venv
fi

_stamp=.venv/.lightning_cmp-install.sha256
_want="$(cat pyproject.toml constraints/dev.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[venv] installing -e \".[dev]\" with constraints/dev.txt (first time: a few minutes)"
    _t0=$SECONDS
    .venv/bin/python -m pip install --quiet -c constraints/dev.txt -e ".[dev]"
    echo "$_want" > "$_stamp"
    echo "[venv] installed in $((SECONDS - _t0)) s"
fi

# shellcheck disable=SC1091
source .venv/bin/activate
unset _repo_root _python _stamp _want _t0
