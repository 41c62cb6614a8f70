"""Schedule projection: measured per-stage costs fed to the simulator predict each schedule's step time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.partition import Chain, profile_blocks, resolve_cuts
from lightning_cmp.schedule import Costs, Placement, get_schedule, lower, simulate

__all__ = ["block_costs", "param_bytes", "predict", "send_model", "send_seconds"]

#: (schedule name in the benchmark, registered schedule, microbatches)
PROJECTED = (("mp", "mp", 1), ("gpipe4", "gpipe", 4), ("cmp", "cmp", 1))


def block_costs(chain: Chain, x: Tensor) -> tuple[list[tuple[float, float]], list[int]]:
    """Per-block (forward, backward) seconds on the whole batch ``x`` and each block's output size in bytes.

    Example:
        >>> costs, sizes = block_costs(trace_chain(model), batch)  # doctest: +SKIP
    """
    costs = profile_blocks(chain, x, repeats=3)
    sizes = []
    with torch.no_grad():
        for i in range(chain.num_blocks):
            x = chain.stage_module(i, i + 1)(x)
            sizes.append(x.numel() * x.element_size())
    return costs, sizes


def _pingpong(rank: int, world: int, sizes: list[int], repeats: int = 5) -> list[float]:
    times = []
    for size in sizes:
        buf = torch.zeros(max(1, size // 4))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            runs.append((time.perf_counter() - start) / 2)
        times.append(statistics.median(runs))
    return times


def send_seconds(sizes: list[int]) -> list[float]:
    """One-way gloo transfer time of messages of ``sizes`` bytes between two processes (median ping-pong).

    Example:
        >>> send_seconds([1 << 20])  # doctest: +SKIP
        [0.0004]
    """
    return [float(t) for t in run_workers(_pingpong, 2, timeout=120, sizes=sizes)[0]]


def send_model(sizes: list[int], seconds: list[float]) -> Callable[[int], float]:
    """Message time for any size: piecewise-linear through the measured points, linear beyond the largest.

    Example:
        >>> model = send_model([100, 200], [1.0, 2.0])
        >>> model(150), model(400), model(0)
        (1.5, 4.0, 1.0)
    """
    points = sorted(zip(sizes, seconds, strict=True))

    def time_of(nbytes: int) -> float:
        if nbytes <= points[0][0]:
            return points[0][1]
        for (s0, t0), (s1, t1) in pairwise(points):
            if nbytes <= s1:
                return t0 + (t1 - t0) * (nbytes - s0) / max(s1 - s0, 1)
        (s0, t0), (s1, t1) = points[-2] if len(points) > 1 else (0, 0.0), points[-1]
        return t1 + (t1 - t0) * (nbytes - s1) / max(s1 - s0, 1)

    return time_of


def predict(
    costs: list[tuple[float, float]], sizes: list[int], params: list[int], ks: range, send: Any
) -> dict[str, dict[int, float]]:
    """Predicted seconds per step of mp, gpipe (M=4) and cmp for every K in ``ks`` (balanced cuts).

    ``costs``/``sizes``/``params`` are per block (whole-batch seconds, output bytes, parameter bytes);
    ``send(nbytes)`` gives a one-way message time. The loss and optimizer step are not modelled.

    Example:
        >>> predict([(1.0, 2.0)] * 8, [4] * 8, [4] * 8, range(2, 3), lambda n: 0.0)["cmp"][2]
        12.0
    """
    out: dict[str, dict[int, float]] = {name: {} for name, _, _ in PROJECTED}
    for k in ks:
        if k > len(costs):
            continue
        cuts = resolve_cuts("balanced", len(costs), k, [f + b for f, b in costs])
        bounds = [0, *cuts, len(costs)]
        forward = [sum(f for f, _ in costs[bounds[s] : bounds[s + 1]]) for s in range(k)]
        backward = [sum(b for _, b in costs[bounds[s] : bounds[s + 1]]) for s in range(k)]
        message = max(sizes[c - 1] for c in cuts)
        exchange = max(sum(params[bounds[s] : bounds[s + 1]]) for s in range(k))
        for name, schedule, m in PROJECTED:
            spec = get_schedule(schedule)
            placement = Placement(k, spec.num_replicas)
            program = lower(spec.build(k, m, placement), placement, m, average_gradients=spec.num_replicas == 2)
            average = send(exchange) if spec.num_replicas == 2 else 0.0
            cost = Costs(forward, backward, send(message // (spec.num_replicas * m)), average=average)
            out[name][k] = simulate(program, placement, m, cost).makespan
    return out


def param_bytes(chain: Chain) -> list[int]:
    """Bytes of parameters in each block."""
    blocks: list[nn.Module] = [chain.stage_module(i, i + 1) for i in range(chain.num_blocks)]
    return [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
