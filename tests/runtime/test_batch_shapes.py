"""Shapes are never announced in advance: odd, tiny and changing batch sizes work in training and evaluation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.partition import trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from tests.helpers.launch import run_workers
from tests.helpers.models import build

SIZES = [9, 1, 2, 5]  # odd split between replicas, one replica empty, one sample each, odd again


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in SIZES]


def _train_and_evaluate(forward: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """One SGD step per batch, each followed by a no-grad forward on a smaller slice of it."""
    losses, evals = [], []
    for x, y in _data():
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():
            evals.append(forward(x[: max(1, len(x) // 2)]))
    return {"losses": losses, "evals": evals}


def _run(rank: int, world: int, schedule: str) -> dict:
    model = build("sequential")
    pipe = Pipeline(trace_chain(model), [3], schedule, Comm(list(range(world)), rank, torch.device("cpu")))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    return {**_train_and_evaluate(pipe, opt), "state": pipe.full_state_dict(dst=None)}


def test_changing_batch_sizes_match_single_process() -> None:
    model = build("sequential")
    ref = _train_and_evaluate(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_losses, ref_evals = ref["losses"], ref["evals"]
    for schedule in ("cmp", "mp"):
        for got in run_workers(_run, 2, timeout=120, schedule=schedule):
            assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
            for a, b in zip(got["evals"], ref_evals, strict=True):
                assert a.shape == b.shape
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
            for k, v in model.state_dict().items():
                assert torch.allclose(got["state"][k], v, rtol=1e-5, atol=1e-7), k


def _different_batches(rank: int, world: int) -> str:
    model = build("sequential")
    pipe = Pipeline(trace_chain(model), [3], "cmp", Comm(list(range(world)), rank, torch.device("cpu")))
    x = torch.full((4, 3, 16, 16), float(rank))  # as if each worker's sampler drew other samples
    try:
        pipe(x)
    except CMPConfigError as err:
        return str(err)
    return "no error"


def test_workers_with_different_batches_are_refused() -> None:
    for message in run_workers(_different_batches, 2, timeout=60):
        assert "rank(s) [1] of the pipeline received a different batch than rank 0" in message
        assert "use_distributed_sampler=True" in message


def _reordered_batches(rank: int, world: int) -> list[str]:
    model = build("sequential")
    pipe = Pipeline(trace_chain(model), [3], "cmp", Comm(list(range(world)), rank, torch.device("cpu")))
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    corrupt = x.clone()
    corrupt[1] = float("nan")  # a corrupt sample
    outcomes = []
    for batch in (x, corrupt):
        # the same batch on both ranks (NaN included), then rank 1's sampler yields it in reverse order
        for mine in (batch, batch if rank == 0 else batch.flip(0)):
            try:
                with torch.no_grad():
                    pipe(mine)
                outcomes.append("no error")
            except CMPConfigError as err:
                outcomes.append(str(err))
    return outcomes


def test_a_reordered_batch_is_refused() -> None:
    # Same samples, same sums, other order: inputs and labels would be paired wrongly on one of the ranks.
    message = (
        "rank(s) [1] of the pipeline received a different batch than rank 0 (batch sizes [6, 6]): every worker of "
        "one pipeline must see the same batch, or inputs and labels silently come from different samples. With "
        "Lightning keep use_distributed_sampler=True (the default) or give every worker the same sampler and seed."
    )
    for outcomes in run_workers(_reordered_batches, 2, timeout=60):
        assert outcomes == ["no error", message, "no error", message]
