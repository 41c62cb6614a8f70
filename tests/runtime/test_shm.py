"""The shared-memory path of the mirror exchange: who qualifies, what it leaves behind, and exact results."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_cmp.runtime import Comm
from lightning_cmp.runtime.averaging import Averager
from lightning_cmp.runtime.shm import SharedRegions, shared_memory_peers
from lightning_cmp.runtime.stage import StageCopy
from tests.helpers.launch import run_workers


def _peers(rank: int, world: int, directory: str, per_rank: bool, disable: bool) -> dict:
    if disable:
        os.environ["LIGHTNING_CMP_SHM"] = "0"
    where = Path(directory) / (f"rank{rank}" if per_rank else "")
    where.mkdir(parents=True, exist_ok=True)
    _, peers = shared_memory_peers(Comm(list(range(world)), rank, torch.device("cpu")), 1 << 10, where)
    return peers


@pytest.mark.parametrize(
    ("per_rank", "disable", "expected"),
    [(False, False, [{1, 2}, {0, 2}, {0, 1}]), (True, False, [set()] * 3), (False, True, [set()] * 3)],
    ids=["one-directory", "separate-directories", "LIGHTNING_CMP_SHM=0"],
)
def test_ranks_pair_up_only_when_they_share_the_directory(
    tmp_path: Path, per_rank: bool, disable: bool, expected: list[set[int]]
) -> None:
    assert run_workers(_peers, 3, directory=str(tmp_path), per_rank=per_rank, disable=disable) == expected
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the probe files are gone


def test_a_peer_region_is_unlinked_once_mapped_and_close_removes_the_rest(tmp_path: Path) -> None:
    a, b = SharedRegions(tmp_path, "tok", me=0), SharedRegions(tmp_path, "tok", me=1)
    mine = a.mine("s0c1", torch.float32, 4)
    a.mine("s1c0", torch.float64, 2)  # never mapped by the peer
    mine.copy_(torch.arange(4.0))
    theirs = b.theirs(0, "s0c1", torch.float32, 4)
    assert theirs.tolist() == [0.0, 1.0, 2.0, 3.0]
    theirs[0] = 9.0  # one memory: the writer sees it
    assert mine[0].item() == 9.0
    assert len(list(tmp_path.iterdir())) == 1  # the mapped file's name is gone, the other is still there
    a.close()
    assert list(tmp_path.iterdir()) == []


def test_a_full_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(RuntimeError, match=r"cannot reserve 4\.0 MiB in .* set LIGHTNING_CMP_SHM=0"):
        SharedRegions(tmp_path, "tok", me=0).mine("s0c0", torch.float32, 1 << 20)


def _back_to_back(rank: int, world: int, shared: bool, rounds: int) -> dict:
    """Parameter averages with no other message between them: a rank that rewrote its region before the
    peer read it would hand over the wrong numbers."""
    torch.manual_seed(rank)
    copies = {(rank, 0): StageCopy(rank, 0, nn.Linear(300, 300))}
    averager = Averager(Comm([0, 1], rank, torch.device("cpu")), copies, shared_memory=shared)
    results = []
    for i in range(rounds):
        values = torch.full((300 * 300 + 300,), float(i * 10 + rank))
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(values, copies[(rank, 0)].module.parameters())
        averager.start_parameters(rank, 0, 1 - rank)
        averager.wait()
        results.append(torch.nn.utils.parameters_to_vector(copies[(rank, 0)].module.parameters()).unique().tolist())
    averager.close()
    return {"results": results, "shared": averager.shared_peers}


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "messages"])
def test_back_to_back_exchanges_give_exact_averages(shared: bool) -> None:
    rounds = 40
    results = run_workers(_back_to_back, 2, shared=shared, rounds=rounds)
    expected = [[i * 10 + 0.5] for i in range(rounds)]
    assert [r["results"] for r in results] == [expected, expected]
    assert [r["shared"] for r in results] == ([{1}, {0}] if shared else [set(), set()])
