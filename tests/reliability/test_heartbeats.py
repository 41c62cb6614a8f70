"""Heartbeats: a stopped worker ends the job within heartbeat_timeout + 15 s, whatever the others are waiting in,
and a busy one (a 30 s step) is never declared lost. The measured times go to ``$HEARTBEAT_JSON`` if set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.reliability.launch import launch, record

HEARTBEAT_S = 10
BOUND_S = HEARTBEAT_S + 15
# the others last saw the worker beat up to one interval (heartbeat_timeout / 6) before it was stopped
EARLIEST_S = HEARTBEAT_S * 5 / 6 - 0.5
_MEASURED: list[dict] = []


def _run(tmp_path: Path, devices: int, runs: list[dict], **extra: object) -> tuple[dict[int, str], float, str, float]:
    cfg = {"out": str(tmp_path), "devices": devices, "heartbeat_timeout": HEARTBEAT_S, "runs": runs, **extra}
    outcome = launch("tests.reliability.scenario", cfg, deadline=300)
    fault = json.loads((tmp_path / "fault.json").read_text())
    errors = {int(m[1]): m[2] for m in re.finditer(r"^\[rank (\d+)\] (PeerLostError: .*)$", outcome.log, re.MULTILINE)}
    exit_s = outcome.gone_at - fault["t"]
    assert outcome.leftovers == [], f"processes left behind: {outcome.leftovers}\n{outcome.log[-3000:]}"
    assert outcome.returncode != 0
    assert outcome.first_error_at is not None, outcome.log[-3000:]
    return errors, exit_s, outcome.log, outcome.first_error_at - fault["t"]


def _record(case: str, exit_s: float, detected_s: float, errors: dict[int, str]) -> None:
    row = {"case": case, "heartbeat_timeout_s": HEARTBEAT_S, "detected_s": round(detected_s, 1)}
    record(_MEASURED, {**row, "all_gone_s": round(exit_s, 1)}, "HEARTBEAT_JSON")
    print(f"{case}: lost worker reported {detected_s:.1f} s, all processes gone {exit_s:.1f} s after the fault")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_busy_worker_is_not_lost_and_a_stopped_one_ends_the_job(tmp_path: Path) -> None:
    # Rank 1 spends 30 s in one step (3 x heartbeat_timeout) while rank 0 waits for it in a collective: no alarm.
    # In the next epoch it is stopped (SIGSTOP) while rank 0 waits in a collective whose own timeout is 120 s.
    busy = {"rank": 1, "batch": 1, "seconds": 30}
    kill = {"rank": 1, "epoch": 1, "batch": 0, "how": "sigstop"}
    errors, exit_s, log, detected_s = _run(tmp_path, 2, [{"name": "a", "epochs": 2, "busy": busy, "kill": kill}])
    spent = json.loads((tmp_path / "busy.json").read_text())
    assert spent["end"] - spent["start"] >= 30  # the busy step ran to its end, and training went on after it
    # (an alarm during the busy step would have ended the job before the fault: _run found fault.json)
    assert errors[0].startswith("PeerLostError: rank 1 on ") and "stopped answering heartbeats" in errors[0]
    assert f"heartbeat_timeout={HEARTBEAT_S} s" in errors[0]
    assert EARLIEST_S <= exit_s < BOUND_S, log[-3000:]
    assert EARLIEST_S <= detected_s <= exit_s
    _record("K=2, rank 1 stopped after a 30 s step", exit_s, detected_s, errors)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("devices", "rank", "extra"),
    [(3, 1, {}), (4, 2, {"num_stages": 2})],
    ids=["K=3 middle stage", "2 pipelines of K=2"],
)
def test_a_stopped_worker_ends_every_worker_within_the_heartbeat_timeout(
    tmp_path: Path, devices: int, rank: int, extra: dict
) -> None:
    kill = {"rank": rank, "epoch": 0, "batch": 2, "how": "sigstop"}
    errors, exit_s, log, detected_s = _run(tmp_path, devices, [{"name": "a", "epochs": 1, "kill": kill}], **extra)
    assert errors, log[-3000:]
    for r, error in errors.items():  # a survivor whose collective broke first names the same rank (the store note)
        assert r != rank and error.startswith(f"PeerLostError: rank {rank} "), (r, error)
    # Which survivor's report reaches the log first is a race (one that saw the heartbeats stop ends itself, and the
    # others' collectives then break on it); that the job ended long before the 120 s collective timeout is what
    # shows the heartbeats at work.
    assert EARLIEST_S <= exit_s < BOUND_S, log[-3000:]
    label = f"K=3, rank {rank} stopped" if devices == 3 else f"K=2 x D=2, rank {rank} stopped"
    assert EARLIEST_S <= detected_s <= exit_s
    _record(label, exit_s, detected_s, errors)
