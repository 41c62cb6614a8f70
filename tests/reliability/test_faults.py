"""A worker that dies or raises takes the whole job down quickly, with an error naming it, and leaves no process."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
from torch.distributed import DistBackendError

from lightning_cmp import CMPStrategy
from lightning_cmp.runtime.comm import PeerLostError, peers_lost
from tests.reliability.launch import launch

BOUND_S = 60  # well under the 120 s default timeout: a dead peer is noticed at once, not by the timeout


def _run_fault(
    tmp_path: Path, devices: int, rank: int, how: str, at: str = "batch_start", **extra: object
) -> tuple[dict, dict[int, str], float]:
    kill = {"rank": rank, "epoch": 0, "batch": 2, "how": how, "at": at}
    cfg = {**extra, "out": str(tmp_path), "devices": devices, "runs": [{"name": "a", "epochs": 2, "kill": kill}]}
    outcome = launch("tests.reliability.scenario", cfg, deadline=240)
    fault = json.loads((tmp_path / "fault.json").read_text())
    errors = {}
    for r in range(devices):
        path = tmp_path / f"rank{r}-a.json"
        if path.exists():
            errors[r] = json.loads(path.read_text())["error"]
        else:  # Lightning's observer may SIGKILL rank 0 once a child exits; the strategy logged the error first
            logged = re.search(rf"^\[rank {r}\] (PeerLostError: .*)$", outcome.log, re.MULTILINE)
            if logged:
                errors[r] = logged.group(1)
    exit_s = outcome.gone_at - fault["t"]
    print(f"K={devices} rank {rank} {how} at {at}: all processes gone {exit_s:.1f} s after the fault; errors {errors}")
    assert outcome.leftovers == [], f"processes left behind: {outcome.leftovers}\n{outcome.log[-3000:]}"
    assert exit_s < BOUND_S, outcome.log[-3000:]
    assert outcome.returncode != 0
    return fault, errors, exit_s


@pytest.mark.timeout(300)
def test_sigkilled_worker_stops_the_others_and_is_named(tmp_path: Path) -> None:
    _, errors, _ = _run_fault(tmp_path, devices=3, rank=2, how="sigkill")
    assert 2 not in errors  # it was killed: it wrote nothing
    assert 0 in errors, "rank 0 did not report"
    # Every survivor names rank 2, not the neighbour whose exit it noticed first. Each reports within about
    # 1 s, before Lightning's observer (polling every 5 s) kills it: 35 of 35 runs had both reports.
    assert errors[0].startswith("PeerLostError: rank 2 (peer of rank 0) stopped answering")
    assert errors[1].startswith("PeerLostError: rank 2 (peer of rank 1) stopped answering")


# Two data-parallel pipelines of 2 stages (4 workers): a worker lost in either pipeline ends every worker of the
# job, the other pipeline's included (it waits in the averaging collective), each naming the lost rank.
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("rank", "how"), [(3, "sigkill"), (1, "sigstop")])
def test_a_worker_lost_in_any_pipeline_ends_every_pipeline(tmp_path: Path, rank: int, how: str) -> None:
    _, errors, exit_s = _run_fault(tmp_path, devices=4, rank=rank, how=how, num_stages=2, timeout=5)
    survivors = [r for r in range(4) if r != rank]
    # Lightning's observer in rank 0 kills every worker once one exits, so not every survivor gets to report
    assert errors, "no survivor reported"
    for r, error in errors.items():
        assert r in survivors and error.startswith("PeerLostError: "), (r, error)
        assert f"rank {rank}" in error, (r, error)
    if how == "sigstop":
        assert exit_s >= 5


@pytest.mark.timeout(300)
def test_worker_raising_in_its_step_stops_the_others(tmp_path: Path) -> None:
    _, errors, _ = _run_fault(tmp_path, devices=2, rank=1, how="raise")
    assert errors[1] == "RuntimeError: injected failure on rank 1"
    assert errors[0].startswith("PeerLostError: rank 1 (peer of rank 0) stopped answering")


@pytest.mark.timeout(300)
def test_killed_launcher_rank0_stops_the_others(tmp_path: Path) -> None:
    _, errors, _ = _run_fault(tmp_path, devices=2, rank=0, how="sigkill")
    assert errors[1].startswith("PeerLostError: rank 0 (peer of rank 1) stopped answering")


@pytest.mark.timeout(300)
def test_hung_worker_is_given_up_after_the_timeout_and_killed(tmp_path: Path) -> None:
    # Rank 1 stops (SIGSTOP) without dying: only the timeout notices; rank 0 then kills it on its way out.
    _, errors, exit_s = _run_fault(tmp_path, devices=2, rank=1, how="sigstop", timeout=5)
    assert errors[0].startswith("PeerLostError: rank 1 (peer of rank 0) stopped answering")
    assert "Timed out" in errors[0]
    assert exit_s >= 5


@pytest.mark.timeout(300)
def test_a_worker_slow_to_start_is_waited_for_and_the_timeout_holds_afterwards(tmp_path: Path) -> None:
    # Rank 1 starts 8 s late, longer than timeout=3: the rendezvous must wait for it (at least 120 s)...
    _, errors, exit_s = _run_fault(tmp_path, devices=2, rank=1, how="sigstop", timeout=3, start_delay=8)
    # ...and the fault is reached (so start-up succeeded), then the hang is given up after 3 s, not 120 s.
    assert errors[0].startswith("PeerLostError: rank 1 (peer of rank 0) stopped answering")
    assert "Timed out waiting 3000ms" in errors[0]
    assert 3 <= exit_s < 20


# Lightning's own collectives (ModelCheckpoint's folder broadcast and file-exists decision, the barrier after
# saving) fail like the pipeline's messages: naming the lost rank, and the launcher stops the rest.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("at", ["setup", "epoch_end", "save"])
def test_worker_killed_outside_a_step_is_named(tmp_path: Path, at: str) -> None:
    _, errors, _ = _run_fault(tmp_path, devices=2, rank=1, how="sigkill", at=at)
    assert errors[0].startswith("PeerLostError: rank 1 (peer of rank 0) stopped answering")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("at", ["epoch_end", "save"])
def test_worker_hung_outside_a_step_is_given_up_and_killed(tmp_path: Path, at: str) -> None:
    _, errors, exit_s = _run_fault(tmp_path, devices=2, rank=1, how="sigstop", at=at, timeout=5)
    assert errors[0].startswith("PeerLostError: rank 1 (peer of rank 0) stopped answering")
    assert "Timed out waiting 5000ms" in errors[0]
    assert exit_s >= 5


def test_a_lost_peer_is_recognised_when_wrapped_in_another_error() -> None:
    # A callback or Lightning may catch the collective's error and raise its own: the launcher must still
    # stop the workers it started. Other errors (a bug in training_step) leave them to exit by themselves.
    try:
        try:
            raise PeerLostError("rank 1 (peer of rank 0) stopped answering")
        except PeerLostError as err:
            raise RuntimeError("saving the checkpoint failed") from err
    except RuntimeError as wrapped:
        assert peers_lost(wrapped)
    assert peers_lost(DistBackendError("NCCL communicator was aborted"))
    assert not peers_lost(RuntimeError("injected failure on rank 1"))


def test_a_hung_peer_is_given_up_after_120_s_by_default() -> None:
    # The process group's timeout (what a worker waits for a hung peer); torch's own default is 30 min.
    assert CMPStrategy()._timeout == timedelta(seconds=120)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cmp", logger=False)
    assert trainer.strategy._timeout == timedelta(seconds=120)  # type: ignore[attr-defined]
    assert CMPStrategy(timeout=timedelta(seconds=5))._timeout == timedelta(seconds=5)
