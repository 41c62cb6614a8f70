"""Run ``python <args>`` from the repository root like a user would, bounded so a hang fails the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ROOT", "run_python", "run_scenario"]


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python *args`` in the repository root with it on ``PYTHONPATH``; asserts a zero exit, shows the output."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run_scenario(module: str, out: Path, devices: int, timeout: float = 400) -> list[Any]:
    """``python -m module '{"out": out, "devices": devices}'`` (Lightning starts the other workers), then what each
    rank saved in ``out/rank<r>.pt``."""
    run_python("-m", module, json.dumps({"out": str(out), "devices": devices}), timeout=timeout)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]
