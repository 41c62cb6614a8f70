"""torchrun --max-restarts restarts a job that lost a worker, and it resumes from its last complete checkpoint
(``fit(ckpt_path="last")`` with ``ModelCheckpoint(save_last=True)``) to the weights of an uninterrupted run.

The measured times go to ``$RESTART_JSON`` if set (for the docs' table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.reliability.launch import launch, record

HEARTBEAT_S = 10
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1")
_MEASURED: list[dict] = []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = {"out": str(out), "devices": 2, "runs": [{"name": "a", "epochs": 2}]}
    outcome = launch("tests.reliability.scenario", cfg, deadline=240)
    assert outcome.returncode == 0, outcome.log[-3000:]
    return torch.load(out / "rank0.pt")["a"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("kill", "case"),
    [
        ({"rank": 1, "epoch": 1, "batch": 2, "how": "sigstop"}, "rank 1 stopped mid-epoch"),
        ({"rank": 0, "epoch": 1, "batch": 0, "how": "sigkill", "at": "save"}, "rank 0 killed while checkpointing"),
    ],
    ids=["stopped", "killed-while-checkpointing"],
)
def test_torchrun_restarts_and_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, uninterrupted: dict, kill: dict, case: str
) -> None:
    _restart(tmp_path, uninterrupted, kill, f"torchrun --max-restarts=1, {case}", launcher=TORCHRUN)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_max_restarts_restarts_a_plain_python_launch(tmp_path: Path, uninterrupted: dict) -> None:
    # `python script.py` with CMPStrategy(max_restarts=1): the strategy hands the script to torch's agent
    kill = {"rank": 1, "epoch": 1, "batch": 2, "how": "sigstop"}
    _restart(
        tmp_path, uninterrupted, kill, "python script.py, max_restarts=1, rank 1 stopped mid-epoch", max_restarts=1
    )


def _restart(
    tmp_path: Path, uninterrupted: dict, kill: dict, case: str, launcher: tuple[str, ...] = (), **extra: object
) -> None:
    # One run that checkpoints every epoch into its own folder and always asks for the last checkpoint, as a
    # user's script would: the first attempt finds none and starts afresh, the restart finds epoch 0's.
    run = {"name": "a", "resume": "a", "epochs": 2, "kill": kill}
    cfg = {"out": str(tmp_path), "devices": 2, "heartbeat_timeout": HEARTBEAT_S, "runs": [run], **extra}
    outcome = launch("tests.reliability.scenario", cfg, deadline=400, launcher=launcher)
    assert outcome.returncode == 0, outcome.log[-4000:]
    assert outcome.leftovers == []
    assert "restart" in outcome.log.lower() or "Restarting" in outcome.log, outcome.log[-3000:]
    fault = json.loads((tmp_path / "fault.json").read_text())
    result = torch.load(tmp_path / "rank0.pt")["a"]
    assert result["start_step"] == 5  # epoch 0's checkpoint: 5 batches of 8 (epoch 1's save never completed)
    assert result["global_step"] == uninterrupted["global_step"] == 10
    for name, value in uninterrupted["state"].items():
        assert torch.equal(result["state"][name], value), name
    restarted_s = result["first_step_at"] - fault["t"]
    # when a survivor reported the lost worker (None: none printed one before the agent stopped them all)
    detected_s = None if outcome.first_error_at is None else round(outcome.first_error_at - fault["t"], 1)
    row = {"case": case, "heartbeat_timeout_s": HEARTBEAT_S, "detected_s": detected_s}
    record(_MEASURED, {**row, "first_step_after_restart_s": round(restarted_s, 1)}, "RESTART_JSON")
    print(f"{case}: first step of the restarted job {restarted_s:.1f} s after the fault")
