"""Workers started by an external launcher: torchrun here; SLURM, LSF and MPI take the same path in Lightning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.strategy.test_trainer import ROOT, assert_states_close, single_device


@pytest.mark.slow
def test_torchrun_workers_train_like_a_single_device(tmp_path: Path) -> None:
    cfg = {"out": str(tmp_path), "devices": 2, "epochs": 1}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*command, "-m", "tests.helpers.scenario", json.dumps(cfg)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Had Lightning not recognised torchrun's environment, it would have started workers of its own on top of
    # torchrun's and the run could not have trained two ranks to the single-device weights.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref_model, _, ref_losses = single_device(1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert_states_close(got["state"], ref_model.state_dict())
