#!/usr/bin/env bash
# GPU smoke test: the CUDA paths of lightning_cmp on one GPU (two workers share it over gloo); a few minutes.
#   bash scripts/gpu_smoke.sh [python -m lightning_cmp.bench.gpu_smoke args...]   (--help; --device cpu runs it anywhere)
# Prints a PASS/FAIL/SKIP table and writes ${OUT:-.}/gpu_smoke.json; exits 1 when a check failed.
#
# Python, first that applies: GPU_SMOKE_PYTHON=/path/to/python; the project's .venv when there is one (made or
# reused by scripts/_venv.sh, as scripts/test.sh does); a python3 that already imports torch and Lightning (the
# lent GPU machines: their image has them, and no package registry can be reached there to build a .venv, which
# is too large to carry); else a new .venv (needs a package registry). The repo root goes on PYTHONPATH, so
# nothing is installed into a Python that is not the project's .venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

if [ -n "${GPU_SMOKE_PYTHON:-}" ]; then
    py="$GPU_SMOKE_PYTHON"
elif [ ! -x .venv/bin/python ] && python3 -c "import torch, lightning" >/dev/null 2>&1; then
    py="$(command -v python3)"
    echo "[gpu_smoke] no .venv here: using $py, which has torch and Lightning (nothing is installed)"
else
    # shellcheck source=scripts/_venv.sh
    source "$here/_venv.sh"
    py="$root/.venv/bin/python"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if command -v nvidia-smi >/dev/null 2>&1; then
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu --format=csv || true
else
    echo "== nvidia-smi: not found"
fi
"$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, '\
'CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")'

echo "== gpu_smoke"
# The script bounds each multi-process launch and its whole run (--timeout, --budget); this is the last resort.
exec timeout --kill-after=20 "${GPU_SMOKE_TIMEOUT:-420}" \
    "$py" -m lightning_cmp.bench.gpu_smoke --device cuda --out "${OUT:-.}/gpu_smoke.json" "$@"
