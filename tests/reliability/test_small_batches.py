"""Batches too small to split: BatchNorm on a 1-sample replica half fails clearly, with the numbers and the fix.

(Empty replica halves and 1-sample batches without BatchNorm work: ``tests/runtime/test_batch_shapes.py``.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.partition import trace_chain
from lightning_cmp.runtime import Comm, PeerLostError, Pipeline
from tests.helpers.launch import run_workers


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(rank: int, world: int, sizes: list[int]) -> list[str]:
    model = _bn_model()
    pipe = Pipeline(trace_chain(model), [2], "cmp", Comm(list(range(world)), rank, torch.device("cpu")))
    outcomes = []
    for n in sizes:
        try:
            F.cross_entropy(pipe(torch.randn(n, 4)), torch.zeros(n, dtype=torch.long)).backward()
            outcomes.append("ok")
        except (CMPConfigError, PeerLostError) as err:
            outcomes.append(f"{type(err).__name__}: {err}")
            break  # the peer may be waiting on this rank: stop here, as a Trainer would
    return outcomes


@pytest.mark.timeout(120)
def test_batch_norm_on_a_one_sample_half_is_a_clear_error() -> None:
    # 4 samples split 2 + 2: fine. 3 samples split 2 + 1: BatchNorm1d cannot train on the 1-sample half.
    # The rank holding replica B's BatchNorm (rank 1) fails with the numbers and the fix; its peer, waiting
    # for that rank's activations, reports it by rank.
    rank0, rank1 = run_workers(_train, 2, timeout=90, sizes=[4, 3])
    assert rank1[0] == rank0[0] == "ok"
    assert rank1[1].startswith("CMPConfigError: a batch of 3 samples is split into microbatches of [2, 1] samples")
    assert "use DataLoader(drop_last=True) to skip a short last batch, or batches of at least 4 samples" in rank1[1]
    assert rank0[1].startswith("PeerLostError: rank 1 (peer of rank 0) stopped answering")
