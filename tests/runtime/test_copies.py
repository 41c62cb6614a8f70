"""The two copies of every stage never drift silently: `Pipeline.check_copies` fails loudly on all ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cmp.errors import CopiesDriftedError
from lightning_cmp.partition import trace_chain
from lightning_cmp.runtime import Comm, Pipeline
from tests.helpers.launch import run_workers


def _check(pipe: Pipeline) -> str | None:
    try:
        pipe.check_copies("after the test's step")
    except CopiesDriftedError as err:
        return str(err)
    return None


def _scenario(rank: int, world: int) -> list[str | None]:
    """K=3 cmp: stage 0's copies on ranks 0 and 2, both of stage 1's on rank 1. A clean step, then one copy
    changed on one rank (as an in-place update in a user's hook would), once per kind of pair."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pipe = Pipeline(trace_chain(model), [2, 4], "cmp", Comm(list(range(world)), rank, torch.device("cpu")))
    opt = torch.optim.SGD(pipe.local_parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    F.cross_entropy(pipe(x), y).backward()
    opt.step()
    results = [_check(pipe)]
    if rank == 0:  # replica A's copy of stage 0 (its mirror is on rank 2)
        with torch.no_grad():
            pipe.copies[(0, 0)].module.get_submodule("0").bias.add_(1e-3)
    results.append(_check(pipe))
    if rank == 0:
        with torch.no_grad():
            pipe.copies[(0, 0)].module.get_submodule("0").bias.sub_(1e-3)
    if rank == 1:  # the second copy of stage 1, on the same rank as the first
        with torch.no_grad():
            pipe.copies[(1, 1)].module.get_submodule("2").weight.mul_(1.0001)
    results.append(_check(pipe))
    pipe.close()
    return results


def _unseeded(rank: int, world: int) -> dict:
    """Every process initialises the model with its own random numbers (a script without a seed)."""
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline(trace_chain(model), [2, 4], "cmp", Comm(list(range(world)), rank, torch.device("cpu")))
    result = {"initial": initial, "check": _check(pipe), "full": pipe.full_state_dict(dst=None)}
    pipe.close()
    return result


def test_copies_start_from_rank_zeros_weights_when_each_process_initialised_its_own() -> None:
    ranks = run_workers(_unseeded, 3)
    assert not torch.equal(ranks[0]["initial"]["0.weight"], ranks[1]["initial"]["0.weight"])  # the premise
    for r in ranks:
        assert r["check"] is None
        assert all(torch.equal(r["full"][k], ranks[0]["initial"][k]) for k in r["full"])


def test_a_copy_changed_on_one_rank_is_named_on_every_rank() -> None:
    for clean, mirror, local in run_workers(_scenario, 3):
        assert clean is None
        assert mirror is not None and "stage 0 (ranks 0 and 2)" in mirror and "'0.bias'" in mirror, mirror
        assert local is not None and "stage 1 (both on rank 1)" in local and "'2.weight'" in local, local
        assert "outside the optimizer" in mirror
