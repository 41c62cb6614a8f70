"""Nothing lost: a job killed mid-epoch resumes with ``fit(ckpt_path="last")`` to the uninterrupted weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.reliability.launch import launch
from tests.strategy.test_trainer import assert_states_close, single_device

EPOCHS = 3
# The job dies at the third batch of the last epoch, after last.ckpt was written at the end of epoch 2.
KILL = {"rank": 0, "epoch": EPOCHS - 1, "batch": 2, "how": "killpg"}
# The parameter-averaging runs also split blocks between workers (Bi-Partition): checkpoints are unchanged and
# the forward workers' copies of the split blocks are refreshed from the restored weights.
BIPARTITION = {2: {"forward": [5], "backward": [4]}, 3: {"forward": [4, 7], "backward": [3, 6]}}


def _launch(tmp_path: Path, devices: int, runs: list[dict]) -> tuple[int, list[dict]]:
    outcome = launch("tests.reliability.scenario", {"out": str(tmp_path), "devices": devices, "runs": runs})
    assert outcome.leftovers == [], outcome.log[-3000:]
    results = []
    for r in range(devices):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
        path.unlink(missing_ok=True)
    return outcome.returncode, results


@pytest.mark.timeout(400)
@pytest.mark.parametrize("devices", [2, 3])
def test_killed_job_resumes_to_the_uninterrupted_weights(tmp_path: Path, devices: int) -> None:
    # Three launches per K: kill(gradient) | resume(gradient) + kill(parameter) | resume(parameter).
    code, _ = _launch(tmp_path, devices, [{"name": "gradient", "epochs": EPOCHS, "kill": KILL}])
    assert code == -9  # the whole job was SIGKILLed
    good = (tmp_path / "gradient" / "last.ckpt").read_bytes()
    runs = [
        {"name": "gradient-resumed", "epochs": EPOCHS, "resume": "gradient"},
        {
            "name": "parameter",
            "averaging": "parameter",
            "epochs": EPOCHS,
            "kill": KILL,
            "partition": BIPARTITION[devices],
        },
    ]
    code, resumed_gradient = _launch(tmp_path, devices, runs)
    assert code == -9
    # The killed run's last.ckpt is the last complete epoch's (read now: the resumed run overwrites it).
    ckpt = torch.load(tmp_path / "parameter" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == EPOCHS - 2 and ckpt["global_step"] == 5 * (EPOCHS - 1)
    code, resumed_parameter = _launch(
        tmp_path,
        devices,
        [
            {
                "name": "p-resumed",
                "averaging": "parameter",
                "epochs": EPOCHS,
                "resume": "parameter",
                "partition": BIPARTITION[devices],
            }
        ],
    )
    assert code == 0
    # With average_every=1 both averaging modes follow single-device SGD (momentum included), so one
    # uninterrupted reference serves both.
    assert good[:2] == b"PK"  # a whole zip archive (torch.save), not a truncated file
    ref, _, _ = single_device(EPOCHS)
    for rank in range(devices):
        for result in (resumed_gradient[rank]["gradient-resumed"], resumed_parameter[rank]["p-resumed"]):
            assert result["start_step"] == 5 * (EPOCHS - 1)  # "last" found the killed run's file: one epoch left
            assert result["global_step"] == 5 * EPOCHS
            assert_states_close(result["state"], ref.state_dict(), rank=rank)
    print(json.dumps({"devices": devices, "ok": True}))
