"""Opt-in soak (``CMP_SOAK=1 pytest tests/reliability/test_soak.py``): 1,000 steps, K=2 and K=3.

Per-worker memory must not grow after warm-up and step time must not creep up. Not run in CI (minutes of
CPU); the figures of 10,000-step runs are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.environ.get("CMP_SOAK") != "1", reason="opt-in: set CMP_SOAK=1")


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("devices", [2, 3])
def test_no_memory_or_step_time_growth(tmp_path: Path, devices: int) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "lightning_cmp.soak", "--steps", "1000", "--devices", str(devices), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    for rank in json.loads(out.read_text())["ranks"]:
        assert rank["rss_growth_mib"] < 16, rank  # allocator noise is a few MiB; a leak per step is not
        # generous: other jobs on a shared machine move step times by tens of percent
        assert rank["step_ms_second_half"] < 1.5 * rank["step_ms_first_half"], rank
