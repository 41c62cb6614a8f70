"""The compared training methods, each as one function that a fresh set of worker processes runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cmp.bench.measure import peak_rss_mib
from lightning_cmp.bench.models import build, make_batches, train_steps
from lightning_cmp.partition import trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.asynchronous import AsyncPipeline
from lightning_cmp.runtime.trace import compute_fraction
from lightning_cmp.schedule import get_schedule

__all__ = ["METHODS", "Method", "plain_step", "run_method"]

StepFn = Callable[[Tensor, Tensor], None]


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: how many workers it uses and what it is."""

    name: str
    world: int
    label: str
    num_microbatches: int = 1


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("single", 1, "single device (1 process, 1 thread)"),
        Method("mp", 2, "lightning_cmp mp"),
        Method("gpipe2", 2, "lightning_cmp gpipe M=2", 2),
        Method("gpipe4", 2, "lightning_cmp gpipe M=4", 4),
        Method("gpipe8", 2, "lightning_cmp gpipe M=8", 8),
        Method("cmp", 2, "lightning_cmp cmp"),
        Method("cmp2", 2, "lightning_cmp cmp N=2 (interleaved)", 2),
        Method("cmp4", 2, "lightning_cmp cmp N=4 (interleaved)", 4),
        Method("pp_gpipe", 2, "torch pipelining ScheduleGPipe M=4", 4),
        Method("pp_1f1b2", 2, "torch pipelining Schedule1F1B M=2", 2),
        Method("pp_1f1b", 2, "torch pipelining Schedule1F1B M=4", 4),
        Method("pp_1f1b8", 2, "torch pipelining Schedule1F1B M=8", 8),
        Method("pp_dualpipev", 2, "torch pipelining ScheduleDualPipeV M=4 (4 stages)", 4),
        Method("ddp", 2, "torch DistributedDataParallel (what Lightning ddp wraps)"),
        Method("spectrain", 2, "lightning_cmp spectrain (asynchronous 1F1B, weight prediction)"),
        Method("pipedream", 2, "lightning_cmp pipedream (asynchronous 1F1B, weight stashing)"),
        Method("async", 2, "lightning_cmp async (asynchronous 1F1B, stale weights)"),
    )
}


def _ours(
    rank: int, world: int, model: nn.Module, method: Method, cuts: list[int], forward_cuts: list[int] | None = None
) -> tuple[StepFn, Pipeline, Callable[[], None] | None]:
    """Our schedule ``method``: its step, its pipeline, and (asynchronous schedules) what drains it."""
    schedule = "gpipe" if method.name.startswith("gpipe") else "cmp" if method.name.startswith("cmp") else method.name
    comm = Comm(list(range(world)), rank, torch.device("cpu"))
    chain = trace_chain(model)
    pipe: Pipeline
    if get_schedule(schedule).asynchronous:
        pipe = AsyncPipeline(chain, cuts, schedule, comm)
    else:
        pipe = Pipeline(
            chain, cuts, schedule, comm, num_microbatches=method.num_microbatches, forward_cuts=forward_cuts
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    drain = None
    if isinstance(pipe, AsyncPipeline):
        pipe.attach_optimizer(opt)

        def update(batch: int) -> None:
            opt.step()
            opt.zero_grad()

        def drain() -> None:
            assert isinstance(pipe, AsyncPipeline)
            pipe.drain(update)

    def step(x: Tensor, y: Tensor) -> None:
        train_steps(pipe, opt, [(x, y)])

    return step, pipe, drain


def plain_step(model: nn.Module, rank: int, world: int, **ddp_options: Any) -> tuple[StepFn, torch.optim.Optimizer]:
    """Single device, or DDP (with ``ddp_options``) where each rank takes its share of the global batch: the step
    and its optimizer."""
    net: nn.Module = model if world == 1 else nn.parallel.DistributedDataParallel(model, **ddp_options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x: Tensor, y: Tensor) -> None:
        loss = F.cross_entropy(net(x.tensor_split(world)[rank]), y.tensor_split(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, opt


def _torch_pipelining(rank: int, world: int, model: nn.Module, method: Method, cuts: list[int]) -> StepFn:
    from torch.distributed import pipelining as pp

    chain = trace_chain(model)
    bounds = [0, *cuts, chain.num_blocks]
    num_stages = len(bounds) - 1
    # DualPipeV's V: rank r holds stages r and 2K-1-r; the others hold stage r.
    indices = [rank, num_stages - 1 - rank] if method.name == "pp_dualpipev" else [rank]
    stages = [
        pp.PipelineStage(chain.stage_module(bounds[i], bounds[i + 1]), i, num_stages, torch.device("cpu"))
        for i in indices
    ]
    params = [p for s in stages for p in s.submod.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if method.name == "pp_dualpipev":
        schedule: Any = pp.ScheduleDualPipeV(list[Any](stages), method.num_microbatches, loss_fn=F.cross_entropy)
    else:
        kind = pp.ScheduleGPipe if method.name.startswith("pp_gpipe") else pp.Schedule1F1B
        schedule = kind(stages[0], method.num_microbatches, loss_fn=F.cross_entropy)
    has_first = 0 in indices
    has_last = num_stages - 1 in indices

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad()
        args = (x,) if has_first else ()
        schedule.step(*args, target=y if has_last else None, losses=[] if has_last else None)
        opt.step()

    return step


def run_method(
    rank: int,
    world: int,
    method: str,
    model: str,
    cuts: list[int],
    steps: int,
    repeats: int,
    batch_size: int,
    size: int,
    forward_cuts: list[int] | None = None,
) -> dict[str, Any]:
    """Worker body: warm up one step, then ``repeats`` timed runs of ``steps`` steps; returns the measurements.

    ``forward_cuts``: our schedules only, a Bi-Partition (``cuts`` being the backward cuts).

    Every rank returns its peak RSS and (our schedules) its per-step executor timings and compute fraction. An
    asynchronous pipeline keeps mini-batches in flight across steps: a timed run is its steps once the warm-up step
    has started filling it; the drain after each run (once per epoch in training) is not timed. It also returns the
    most bytes of weight copies (stashes, prediction scratch) the rank held at once.

    Examples:
        >>> run_workers(run_method, 2, method="cmp", model="tiny", cuts=[5], steps=2, repeats=3,
        ...             batch_size=16, size=16)  # doctest: +SKIP
    """
    spec = METHODS[method]
    net = build(model, size)
    net.train()
    pipe: Pipeline | None = None
    drain: Callable[[], None] | None = None
    if method in ("single", "ddp"):
        step, _ = plain_step(net, rank, world)
    elif method.startswith("pp_"):
        step = _torch_pipelining(rank, world, net, spec, cuts)
    else:
        step, pipe, drain = _ours(rank, world, net, spec, cuts, forward_cuts)
    data = make_batches(steps + 1, batch_size, size)
    step(*data[0])  # warm-up
    seconds, compute, last_timings, copies = [], [], [], 0
    for _ in range(repeats):
        _barrier(world)
        start = time.perf_counter()
        for x, y in data[1:]:
            if pipe is not None:
                pipe.executor.timings = []
            begin = time.perf_counter()
            step(x, y)
            if pipe is not None and pipe.executor.timings is not None:
                last_timings = [("STEP", begin, time.perf_counter()), *pipe.executor.timings]
                compute.append(compute_fraction(pipe.executor.timings, begin, time.perf_counter()))
            if isinstance(pipe, AsyncPipeline):
                copies = pipe.weight_copy_bytes(peak=True)
        _barrier(world)
        seconds.append(time.perf_counter() - start)
        if drain is not None:
            drain()
    return {
        "rank": rank,
        "seconds": seconds,
        "compute": compute,
        "timings": last_timings,
        "rss_mib": peak_rss_mib(),
        "weight_copy_bytes": copies,
    }


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
