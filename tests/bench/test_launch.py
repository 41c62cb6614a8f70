"""The worker launcher shared by the benchmark and the tests: errors come back, dead workers fail fast."""

from __future__ import annotations

import os
import time

import pytest

from lightning_cmp.bench.launch import run_workers


def _rank1_dies(rank: int, world: int) -> int:
    if rank == 1:
        os._exit(3)  # no report, no traceback: a crash
    time.sleep(60)
    return rank


def _rank1_raises(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("broken on purpose")
    return rank


def _ranks(rank: int, world: int) -> int:
    return rank


def test_results_come_back_by_rank() -> None:
    assert run_workers(_ranks, 3) == [0, 1, 2]


def test_a_worker_that_dies_without_reporting_fails_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"died without reporting \(rank: exit code\) \{1: 3\}"):
        run_workers(_rank1_dies, 2, timeout=120)
    assert time.monotonic() - start < 30  # not the 120 s timeout, nor rank 0's 60 s sleep


def test_a_worker_error_comes_back_with_its_traceback() -> None:
    with pytest.raises(AssertionError, match=r"(?s)rank 1:.*ValueError: broken on purpose"):
        run_workers(_rank1_raises, 2, timeout=120)
