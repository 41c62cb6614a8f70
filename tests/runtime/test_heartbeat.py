"""Heartbeats on a real TCP store, in one process: a silent worker is declared lost, a finished or busy one is not."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from lightning_cmp.runtime import process
from lightning_cmp.runtime.heartbeat import Heartbeat

TIMEOUT = timedelta(seconds=0.6)
INTERVAL = 0.05


def _pair() -> tuple[Heartbeat, Heartbeat, list[tuple[int, int, str]]]:
    """Two workers' heartbeats on one store; what each declared lost goes into the list returned."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=5))
    lost: list[tuple[int, int, str]] = []
    processes = {0: ("host-a", 10), 1: ("host-b", 11)}
    beats = [
        Heartbeat(
            store, rank, [0, 1], processes, TIMEOUT, INTERVAL, on_lost=lambda r, m, me=rank: lost.append((me, r, m))
        )
        for rank in (0, 1)
    ]
    for beat in beats:
        beat.start()
    return beats[0], beats[1], lost


def _freeze(beat: Heartbeat) -> None:
    """The worker stops beating without saying so, as a stopped process or a dead host would."""
    beat._stop.set()
    beat._thread.join()


def test_workers_that_beat_are_never_declared_lost() -> None:
    a, b, lost = _pair()
    time.sleep(4 * TIMEOUT.total_seconds())  # the main thread is busy elsewhere: the threads keep beating
    assert lost == [] and a.beats > 10 and b.beats > 10
    # its whole cost: a few store round trips per beat (here 20 beats/s; by default one every 5 s)
    per_beat = a.busy_s / a.beats
    assert per_beat < 0.01, per_beat
    print(f"heartbeat: {per_beat * 1e3:.2f} ms of store calls per beat")
    a.stop()
    b.stop()


def test_a_silent_worker_is_declared_lost_naming_its_rank_and_host() -> None:
    a, b, lost = _pair()
    time.sleep(0.2)
    _freeze(b)
    start = time.monotonic()
    while not lost and time.monotonic() - start < 5:
        time.sleep(0.02)
    took = time.monotonic() - start
    assert lost and lost[0][:2] == (0, 1), lost
    assert TIMEOUT.total_seconds() * 0.9 < took < TIMEOUT.total_seconds() + 4 * INTERVAL + 0.5, took
    assert "rank 1 on host-b stopped answering heartbeats" in lost[0][2]
    assert "heartbeat_timeout=0.6 s" in lost[0][2]
    a.stop()


def test_a_worker_that_stops_cleanly_or_is_not_watched_is_not_declared_lost() -> None:
    a, b, lost = _pair()
    b.stop()  # marks itself done first
    time.sleep(3 * TIMEOUT.total_seconds())
    assert lost == []
    a.stop()
    c, d, lost = _pair()
    c.watch(False)  # between two Trainer runs: only beat
    _freeze(d)
    time.sleep(3 * TIMEOUT.total_seconds())
    assert lost == []
    c.watch(True)  # watching again starts every clock afresh: d is lost a timeout later, not at once
    time.sleep(TIMEOUT.total_seconds() / 2)
    assert lost == []
    time.sleep(TIMEOUT.total_seconds() + 4 * INTERVAL)
    assert [r for _, r, _ in lost] == [1]
    c.stop()


def test_without_a_tcp_store_heartbeats_turn_off_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a process group the user made on a file store: the set-up goes on, without heartbeats
    monkeypatch.setattr(process, "_state", {"registered": True, "failed": False, "heartbeat": None})
    # lightning_cmp.strategy, once imported, prints the package's messages itself (not through the root logger)
    monkeypatch.setattr(logging.getLogger("lightning_cmp"), "propagate", True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        process.watch_heartbeats(True, 0, 2, {}, TIMEOUT, lambda rank, message: None)
    finally:
        dist.destroy_process_group()
    assert process._state["heartbeat"] is False
    assert "heartbeats are off" in caplog.text
