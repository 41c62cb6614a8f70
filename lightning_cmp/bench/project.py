"""Schedule projection: measured per-stage costs fed to the simulator predict each schedule's step time.

CPU kernels do not scale linearly with the batch (ResNet-18 here: a half batch costs ~65% of a whole one), so
blocks are profiled at every microbatch size a projected schedule runs, not scaled down from the whole batch.
The optimizer step and, for ``cmp``, the mirror exchange are added from measured per-byte costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.partition import Chain, profile_blocks, resolve_cuts, stage_pass_costs
from lightning_cmp.schedule import Costs, Placement, get_schedule, lower, simulate

__all__ = [
    "PROJECTED",
    "StepModel",
    "activation_bytes",
    "block_costs",
    "exchange_seconds_per_byte",
    "optimizer_seconds_per_byte",
    "param_bytes",
    "predict",
    "send_model",
    "send_seconds",
]

#: (schedule name in the benchmark, registered schedule, microbatches)
PROJECTED = (("mp", "mp", 1), ("gpipe4", "gpipe", 4), ("cmp", "cmp", 1))


def block_costs(chain: Chain, x: Tensor, rows: list[int]) -> dict[int, list[tuple[float, float]]]:
    """Per-block (forward, backward) seconds for each batch size in ``rows`` (the first ``n`` rows of ``x``).

    Examples:
        >>> costs = block_costs(trace_chain(model), batch, rows=[64, 32])  # doctest: +SKIP
        >>> len(costs[32]) == chain.num_blocks  # doctest: +SKIP
        True
    """
    return {n: profile_blocks(chain, x[:n], repeats=3) for n in rows}


def activation_bytes(chain: Chain, x: Tensor) -> list[int]:
    """Bytes of each block's output for the batch ``x``."""
    sizes = []
    with torch.no_grad():
        for i in range(chain.num_blocks):
            x = chain.stage_module(i, i + 1)(x)
            sizes.append(x.numel() * x.element_size())
    return sizes


def optimizer_seconds_per_byte(model: nn.Module, repeats: int = 5) -> float:
    """Median time of the benchmark's optimizer step (SGD, momentum 0.9) per byte of parameters."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opt.step()  # creates the momentum buffers
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) / sum(p.numel() * p.element_size() for p in params)


def exchange_seconds_per_byte(nbytes: int = 32 << 20, repeats: int = 5) -> float:
    """CPU time per byte of a shared-memory exchange: copy into the region, then sum out of the peer's."""
    own, region, other = torch.randn(nbytes // 4), torch.empty(nbytes // 4), torch.randn(nbytes // 4)
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        region.copy_(own)
        torch.add(region, other, out=own)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs[1:]) / nbytes


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

    Examples:
        >>> send_seconds([1 << 20])  # doctest: +SKIP
        [0.0004]
    """
    return [float(t) for t in run_workers(_pingpong, 2, timeout=120, sizes=sizes)[0]]


def send_model(sizes: list[int], seconds: list[float]) -> Callable[[int], float]:
    """Message time for any size: piecewise-linear through the measured points, linear beyond the largest.

    Examples:
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


@dataclass(frozen=True)
class StepModel:
    """Everything the projection is built from, measured on this machine.

    ``costs`` maps a microbatch size (rows) to per-block (forward, backward) seconds; ``activations`` and
    ``params`` are per-block bytes (activations for the whole batch); ``send(nbytes)`` is a one-way message
    time; ``exchange_per_byte`` is ``None`` when mirrors exchange by messages instead of shared memory; ``whole``
    and ``corun`` calibrate the block costs (`block_costs`).
    """

    batch_size: int
    costs: dict[int, list[tuple[float, float]]]
    activations: list[int]
    params: list[int]
    send: Callable[[int], float]
    step_per_byte: float
    exchange_per_byte: float | None
    whole: dict[int, float] | None = None
    corun: float = 1.0

    def rows(self, num_replicas: int, num_microbatches: int) -> int:
        return self.batch_size // (num_replicas * num_microbatches)

    def block_costs(self, rows: int, concurrent: bool = False) -> list[tuple[float, float]]:
        """Per-block costs at ``rows``, calibrated: blocks profiled one at a time pay per-call and cache costs that a
        stage running them back to back does not, so with ``whole`` (the whole model's measured forward + backward
        per batch size) they are scaled to sum to it. ``concurrent``: every worker computes at the same moment
        throughout (``cmp``), so compute is slowed by the measured co-run factor too.

        Examples:
            >>> m = StepModel(4, {4: [(1.0, 2.0), (1.0, 2.0)]}, [4, 4], [4, 4], lambda n: 0.0, 0.0, 0.0, {4: 3.0}, 1.5)
            >>> m.block_costs(4), m.block_costs(4, concurrent=True)
            ([(0.5, 1.0), (0.5, 1.0)], [(0.75, 1.5), (0.75, 1.5)])
        """
        costs = self.costs[rows]
        scale = self.corun if concurrent else 1.0
        if self.whole is not None and rows in self.whole:
            scale *= self.whole[rows] / sum(f + b for f, b in costs)
        return [(f * scale, b * scale) for f, b in costs]


def predict(model: StepModel, ks: range) -> dict[str, dict[int, float]]:
    """Predicted seconds per step of mp, gpipe (M=4) and cmp for every K in ``ks`` (balanced cuts).

    The simulator scales a whole-batch cost down by the number of microbatches; each schedule gets its own
    microbatch size's measured costs scaled up by the same factor, so the simulator sees the real time.

    Examples:
        >>> costs = {8: [(1.0, 2.0)] * 8, 4: [(0.5, 1.0)] * 8, 2: [(0.25, 0.5)] * 8}
        >>> m = StepModel(8, costs, [4] * 8, [4] * 8, lambda n: 0.0, 0.0, 0.0)
        >>> predict(m, range(2, 3))["cmp"][2]
        12.0
    """
    out: dict[str, dict[int, float]] = {name: {} for name, _, _ in PROJECTED}
    whole = model.costs[model.batch_size]
    for k in ks:
        if k > len(whole):
            continue
        cuts = resolve_cuts("balanced", len(whole), k, [f + b for f, b in whole])
        for name, schedule, m in PROJECTED:
            if model.rows(get_schedule(schedule).num_replicas, m) in model.costs:
                out[name][k] = _project(model, cuts, schedule, m)
    return out


def _project(model: StepModel, cuts: list[int], schedule: str, m: int) -> float:
    """One schedule's step on one split: simulated pipeline, then the slowest rank's optimizer step."""
    spec = get_schedule(schedule)
    k, replicas = len(cuts) + 1, spec.num_replicas
    bounds = [0, *cuts, len(model.params)]
    costs = model.block_costs(model.rows(replicas, m), concurrent=replicas == 2)
    scale = replicas * m  # the simulator divides by this; these costs are already per microbatch
    forward, backward = stage_pass_costs(costs, cuts, scale)
    stage_bytes = [sum(model.params[a:b]) for a, b in pairwise(bounds)]
    message = max(model.activations[c - 1] for c in cuts) // scale
    exchange = max(stage_bytes)
    per_byte = model.exchange_per_byte
    average = 0.0 if replicas == 1 else (per_byte * exchange if per_byte is not None else model.send(exchange))
    placement = Placement(k, replicas)
    program = lower(spec.build(k, m, placement), placement, m, average_gradients=replicas == 2)
    makespan = simulate(program, placement, m, Costs(forward, backward, model.send(message), average=average)).makespan
    held = [sum(stage_bytes[s] for _, s in placement.stages_on(rank)) for rank in range(k)]
    return makespan + model.step_per_byte * max(held)


def param_bytes(chain: Chain) -> list[int]:
    """Bytes of parameters in each block."""
    blocks: list[nn.Module] = [chain.stage_module(i, i + 1) for i in range(chain.num_blocks)]
    return [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
