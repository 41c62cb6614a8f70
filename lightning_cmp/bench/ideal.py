"""The ideal step of each method, from measured compute: what it would take with free communication and no waiting.

The benchmark times the whole model's forward + backward (one process, one thread, the benchmark's loss and
SGD with momentum) at every batch size a method runs, and the optimizer step:

* ``single``: ``T(B) + opt``: one device does everything.
* ``cmp`` at K = 2 and DDP: ``T(B/2) + opt``: each worker runs the whole model (two half copies under ``cmp``) on
  half the batch and steps a whole model's worth of parameters.
* ``mp``: ``T(B) + opt / 2``: the two stages run one after the other; each worker steps half the model.

``T`` is measured **alone** (one process on an idle machine), the issue's definition. Two workers that compute at
the same time on one machine also share its caches, memory bandwidth and (on a VM) physical cores; so the
profile also times two independent processes running ``T(B/2)`` at once, with no communication at all
(``co-run``). That is the most any two-worker data-split method (cmp, DDP) can reach here; what separates a
method from it is the method's own cost. ``mp`` runs one worker at a time, so it pays no co-run slowdown.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.bench.models import build, make_batches

__all__ = ["compute_profile", "ideal_step", "whole_step_seconds"]


def whole_step_seconds(model: nn.Module, x: Tensor, y: Tensor, repeats: int = 5) -> tuple[float, float, float]:
    """Median seconds of the whole model's forward + loss + backward on ``x``, of one SGD (momentum) step, and of
    ``zero_grad()`` (Lightning's and torch's default ``set_to_none=True``: the gradients' memory is freed, and the next
    backward allocates it again), after one warm-up. The three are timed apart.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
        >>> times = whole_step_seconds(net, torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3]), repeats=2)
        >>> all(t > 0 for t in times)
        True
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    compute, steps, frees = [], [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad()
        frees.append(time.perf_counter() - start)
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        middle = time.perf_counter()
        opt.step()
        compute.append(middle - start)
        steps.append(time.perf_counter() - middle)
    return statistics.median(compute[1:]), statistics.median(steps[1:]), statistics.median(frees[1:])


def _corun(rank: int, world: int, model: str, rows: int, size: int, repeats: int) -> float:
    """Worker body: ``T(rows)`` while the other worker runs the same at the same moment (a barrier before each)."""
    net = build(model, size)
    net.train()
    x, y = make_batches(1, rows, size)[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    runs = []
    for _ in range(repeats + 1):
        opt.zero_grad()
        dist.barrier()
        start = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        runs.append(time.perf_counter() - start)
        opt.step()
    return statistics.median(runs[1:])


def compute_profile(model: str, batch_size: int, size: int, rows: list[int], repeats: int = 5) -> dict[str, Any]:
    """Whole-model compute at every batch size in ``rows`` (alone, 1 thread), the optimizer step and freeing the
    gradients (``zero_grad()``: ``free_grads_s``, a whole model's, as a `cmp` worker at K = 2 frees them each step;
    DDP with ``gradient_as_bucket_view`` frees as much inside its backward, each gradient once it is copied into
    its bucket), the co-run ``T(B/2)`` (two processes at once, 1 thread each), and the half-batch efficiency
    ``T(B) / (2 T(B/2))``.

    Examples:
        >>> p = compute_profile("tiny", 16, 16, [16, 8], repeats=2)  # doctest: +SKIP
        >>> sorted(p)  # doctest: +SKIP
        ['corun_half_s', 'corun_factor', 'free_grads_s', 'half_batch_efficiency', 'optimizer_s', 'whole_s']
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = build(model, size)
        net.train()
        x, y = make_batches(1, max(rows), size)[0]
        whole, optimizer, frees = {}, [], []
        for n in sorted(set(rows), reverse=True):
            whole[n], step, free = whole_step_seconds(net, x[:n], y[:n], repeats)
            optimizer.append(step)
            frees.append(free)
    finally:
        torch.set_num_threads(threads)
    half = batch_size // 2
    corun = run_workers(_corun, 2, model=model, rows=half, size=size, repeats=repeats)
    corun_half = statistics.mean(corun)
    return {
        "whole_s": {str(n): t for n, t in whole.items()},
        "optimizer_s": statistics.median(optimizer),
        "free_grads_s": statistics.median(frees),
        "corun_half_s": corun_half,
        "corun_factor": corun_half / whole[half] if half in whole else None,
        "half_batch_efficiency": whole[batch_size] / (2 * whole[half]) if half in whole else None,
    }


def ideal_step(method: str, profile: dict[str, Any], batch_size: int, corun: bool = False) -> float | None:
    """Seconds of ``method``'s ideal step (see the module docstring), ``None`` for a method without one here
    (pipelines with bubbles, two threads, asynchronous schedules). ``corun``: with the co-run compute.

    Examples:
        >>> p = {"whole_s": {"8": 1.0, "4": 0.6}, "optimizer_s": 0.1, "corun_half_s": 0.7}
        >>> [round(ideal_step(m, p, 8, c), 3) for m, c in (("cmp", False), ("cmp", True), ("mp", False))]
        [0.7, 0.8, 1.05]
        >>> ideal_step("gpipe4", p, 8) is None
        True
    """
    whole, opt = profile["whole_s"], profile["optimizer_s"]
    if method in ("cmp", "cmp_gloo") or method.startswith("ddp"):
        return (profile["corun_half_s"] if corun else whole[str(batch_size // 2)]) + opt
    if corun:
        return None
    if method == "single":
        return float(whole[str(batch_size)] + opt)
    if method == "mp":
        return float(whole[str(batch_size)] + opt / 2)
    return None
