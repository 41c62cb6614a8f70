"""GPipe trains to the same weights as single-process SGD on the same batches (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_cmp.partition import trace_chain, uniform_cuts
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from tests.helpers.launch import run_workers
from tests.helpers.models import batches, build, train_reference

STEPS = 2
CASES = [("sequential", 2), ("sequential", 4), ("resnet18", 2), ("resnet18", 4)]  # (model, num_microbatches)


def _train(rank: int, world: int, model_name: str, num_microbatches: int) -> dict:
    model = build(model_name)
    chain = trace_chain(model)
    comm = Comm(list(range(world)), rank, torch.device("cpu"))
    pipe = Pipeline(chain, uniform_cuts(chain.num_blocks, world), "gpipe", comm, num_microbatches=num_microbatches)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    losses = []
    for x, y in batches(STEPS):
        loss = F.cross_entropy(pipe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"state": pipe.full_state_dict(dst=None), "losses": losses}


def _all_cases(rank: int, world: int) -> list[dict]:
    return [_train(rank, world, *case) for case in CASES]


@pytest.fixture(scope="module")
def references() -> dict:
    return {name: train_reference(name, STEPS) for name in {c[0] for c in CASES}}


@pytest.mark.parametrize("world", [2, 3])
def test_gpipe_weights_equal_single_process(world: int, references: dict) -> None:
    results = run_workers(_all_cases, world, timeout=240)  # one launch per K keeps the test cheap
    for index, (model_name, num_microbatches) in enumerate(CASES):
        ref_state, ref_losses = references[model_name]
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            label = f"{model_name} gpipe M={num_microbatches} K={world} rank {rank}"
            assert set(got["state"]) == set(ref_state), label
            for name, ref in ref_state.items():
                assert torch.allclose(got["state"][name], ref, atol=1e-5, rtol=1e-5), f"{label}: {name}"
            assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), label
