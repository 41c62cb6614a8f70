"""Tests for per-block timing: shape of the result and no side effects on the model, grads or RNG."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
from torch import nn

from lightning_cmp.partition import profile_blocks, trace_chain

torch.set_num_threads(1)


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


@pytest.mark.parametrize("context", [nullcontext, torch.no_grad, torch.inference_mode])
def test_profile_blocks_has_no_side_effects(context: Callable[[], AbstractContextManager[object]]) -> None:
    torch.manual_seed(0)
    model = _model()
    model(torch.randn(2, 3, 6, 6)).sum().backward()  # the user already has grads and BatchNorm statistics
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.clone() for n, g in grads.items() if g is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    chain = trace_chain(model)
    with context():
        example = torch.randn(2, 3, 6, 6)
        rng = torch.get_rng_state()
        times = profile_blocks(chain, example, repeats=2)
    assert len(times) == chain.num_blocks == 5
    assert all(f > 0 and b > 0 for f, b in times)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert all(torch.equal(p.grad, grad_values[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert model.training


def test_profile_blocks_leaves_grads_unset() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    chain = trace_chain(model)
    times = profile_blocks(chain, torch.randn(3, 4), repeats=1)
    assert len(times) == 2 and all(f > 0 for f, _ in times)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        profile_blocks(chain, torch.randn(3, 4), repeats=0)
