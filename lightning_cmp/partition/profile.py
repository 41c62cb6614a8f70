"""Time each block's forward and backward on an example input, leaving no trace on the model."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_cmp.partition.chain import Chain
from lightning_cmp.partition.materialize import has_meta, materialize

__all__ = ["profile_blocks"]


def profile_blocks(chain: Chain, example_input: Tensor, repeats: int = 3) -> list[tuple[float, float]]:
    """Per block, the median (forward seconds, backward seconds) over ``repeats`` runs after one warm-up.

    Blocks run one at a time, in the module's current train/eval mode, on a detached copy of the previous
    block's output. Buffers (BatchNorm statistics), parameter ``.grad`` and the RNG state are restored
    afterwards, and it works under ``torch.no_grad()`` / ``torch.inference_mode()``. A block whose output
    does not require grad (nothing to differentiate) reports a backward time of 0.0. A block still on the meta
    device (a model built in ``configure_model``) is timed on a materialised copy, one block at a time.

    Examples:
        >>> from lightning_cmp.partition import trace_chain
        >>> chain = trace_chain(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> times = profile_blocks(chain, torch.randn(4, 8))
        >>> len(times), all(f > 0 for f, _ in times)
        (3, True)
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    with torch.inference_mode(False), torch.enable_grad(), restored(chain.root, example_input.device):
        x = example_input.clone()
        timings = []
        for block in range(chain.num_blocks):
            stage = runnable(chain.stage_module(block, block + 1), example_input.device)
            runs = [_time_block(stage, x) for _ in range(repeats + 1)][1:]
            timings.append((statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
            x = runs[-1][2]
    return timings


def runnable(stage: nn.Module, device: torch.device) -> nn.Module:
    """``stage`` itself, or a materialised copy of it when its tensors are still on the meta device."""
    if not has_meta(stage):
        return stage
    stage = copy.deepcopy(stage)
    materialize(stage, device)
    return stage


def _time_block(stage: nn.Module, x: Tensor) -> tuple[float, float, Tensor]:
    """One forward and backward of ``stage`` on a fresh leaf copy of ``x``; returns both times and the output."""
    inp = x.detach().requires_grad_(x.is_floating_point())
    start = now(x)
    out = stage(inp)
    forward = now(x) - start
    if not out.requires_grad:
        return forward, 0.0, out.detach()
    start = now(x)
    torch.autograd.backward(out, grad_tensors=torch.ones_like(out))
    return forward, now(x) - start, out.detach()


def now(x: Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


@contextmanager
def restored(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Fork the RNG, snapshot buffers and detach ``.grad``; put all three back on exit."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    grads = [(p, p.grad) for p in module.parameters()]
    for p, _ in grads:
        p.grad = None
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for p, grad in grads:
            p.grad = grad
