"""Workers started by an external launcher: torchrun here; SLURM, LSF and MPI take the same path in Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.python import run_python
from tests.strategy.test_trainer import assert_states_close, single_device


@pytest.mark.slow
def test_torchrun_workers_train_like_a_single_device(tmp_path: Path) -> None:
    cfg = {"out": str(tmp_path), "devices": 2, "epochs": 1}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_python(*torchrun, "-m", "tests.helpers.scenario", json.dumps(cfg))
    # Had Lightning not recognised torchrun's environment, it would have started workers of its own on top of
    # torchrun's and the run could not have trained two ranks to the single-device weights.
    ref_model, _, ref_losses = single_device(1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert_states_close(got["state"], ref_model.state_dict())
