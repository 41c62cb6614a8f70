"""The compared training methods, each as one function that a fresh set of worker processes runs."""

from __future__ import annotations

import os
import statistics
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
from lightning_cmp.partition import Chain, trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.asynchronous import AsyncPipeline
from lightning_cmp.runtime.trace import compute_fraction
from lightning_cmp.schedule import get_schedule

__all__ = ["BREAKDOWN", "METHODS", "Method", "breakdown", "plain_step", "run_method"]

StepFn = Callable[[Tensor, Tensor], None]


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: how many workers it uses and what it is.

    ``family``: rows that differ only in a setting (microbatches, bucket size) and are reported as their best;
    ``threads``: torch threads per worker; ``env``: variables set in each worker before it builds anything;
    ``bucket_mib``: DDP's ``bucket_cap_mb``.
    """

    name: str
    world: int
    label: str
    num_microbatches: int = 1
    family: str = ""
    threads: int = 1
    env: tuple[tuple[str, str], ...] = ()
    bucket_mib: float = 25.0

    @property
    def microbatch_rows(self) -> int:
        """How many microbatches the global batch is cut into (replicas x microbatches): the batch size its
        stages run at is the global batch divided by this."""
        return self.num_microbatches * (2 if self.name.startswith(("cmp", "ddp")) else 1)


_PP = "torch pipelining"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("single", 1, "single device (1 process, 1 thread)", family="single device, 1 thread"),
        Method("single2", 1, "single device (1 process, 2 threads)", family="single device, 2 threads", threads=2),
        Method("mp", 2, "lightning_cmp mp", family="lightning_cmp mp"),
        Method("gpipe2", 2, "lightning_cmp gpipe M=2", 2, family="lightning_cmp gpipe"),
        Method("gpipe4", 2, "lightning_cmp gpipe M=4", 4, family="lightning_cmp gpipe"),
        Method("gpipe8", 2, "lightning_cmp gpipe M=8", 8, family="lightning_cmp gpipe"),
        Method("cmp", 2, "lightning_cmp cmp", family="lightning_cmp cmp"),
        Method(
            "cmp_gloo", 2, "lightning_cmp cmp, exchange over gloo (shared memory off)",
            family="lightning_cmp cmp over gloo", env=(("LIGHTNING_CMP_SHM", "0"),),
        ),
        Method("cmp2", 2, "lightning_cmp cmp N=2 (interleaved)", 2, family="lightning_cmp cmp N>1"),
        Method("cmp4", 2, "lightning_cmp cmp N=4 (interleaved)", 4, family="lightning_cmp cmp N>1"),
        Method("pp_gpipe2", 2, f"{_PP} ScheduleGPipe M=2", 2, family=f"{_PP} ScheduleGPipe"),
        Method("pp_gpipe", 2, f"{_PP} ScheduleGPipe M=4", 4, family=f"{_PP} ScheduleGPipe"),
        Method("pp_gpipe8", 2, f"{_PP} ScheduleGPipe M=8", 8, family=f"{_PP} ScheduleGPipe"),
        Method("pp_1f1b2", 2, f"{_PP} Schedule1F1B M=2", 2, family=f"{_PP} Schedule1F1B"),
        Method("pp_1f1b", 2, f"{_PP} Schedule1F1B M=4", 4, family=f"{_PP} Schedule1F1B"),
        Method("pp_1f1b8", 2, f"{_PP} Schedule1F1B M=8", 8, family=f"{_PP} Schedule1F1B"),
        Method("pp_dualpipev", 2, f"{_PP} ScheduleDualPipeV M=4 (4 stages)", 4, family=f"{_PP} ScheduleDualPipeV"),
        Method("pp_dualpipev8", 2, f"{_PP} ScheduleDualPipeV M=8 (4 stages)", 8, family=f"{_PP} ScheduleDualPipeV"),
        Method("ddp_b1", 2, "torch DDP, 1 MiB buckets", family="torch DDP", bucket_mib=1.0),
        Method("ddp_b4", 2, "torch DDP, 4 MiB buckets", family="torch DDP", bucket_mib=4.0),
        Method("ddp", 2, "torch DDP, 25 MiB buckets (torch's default)", family="torch DDP"),
        Method("spectrain", 2, "lightning_cmp spectrain (asynchronous 1F1B, weight prediction)"),
        Method("pipedream", 2, "lightning_cmp pipedream (asynchronous 1F1B, weight stashing)"),
        Method("async", 2, "lightning_cmp async (asynchronous 1F1B, stale weights)"),
    )
}  # fmt: skip


class _TimedSGD(torch.optim.SGD):
    """SGD that records when each of its steps ran, as ``("OPTIMIZER", start, end)`` (the benchmark's breakdown)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timings: list[tuple[str, float, float]] = []

    def step(self, closure: Any = None) -> Any:
        start = time.perf_counter()
        out = super().step(closure)
        self.timings.append(("OPTIMIZER", start, time.perf_counter()))
        return out


def _ours(
    rank: int, world: int, model: nn.Module, method: Method, cuts: list[int], forward_cuts: list[int] | None = None
) -> tuple[StepFn, Pipeline, Callable[[], None] | None, _TimedSGD]:
    """Our schedule ``method``: its step, its pipeline, (asynchronous schedules) what drains it, and its optimizer
    (which records its step times)."""
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
    opt = _TimedSGD(model.parameters(), lr=0.01, momentum=0.9)
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

    return step, pipe, drain, opt


#: What the breakdown of a step of our schedules is made of (seconds per step, medians over the timed steps).
BREAKDOWN = ("compute", "wait for activations and gradients", "output broadcast", "wait for the exchange",
             "posting messages", "optimizer step", "other")  # fmt: skip


def breakdown(timings: list[tuple[str, float, float]]) -> dict[str, float]:
    """One step's time by `BREAKDOWN` part, from its executor timings with the whole step first (``STEP``) and the
    optimizer's (``OPTIMIZER``); ``other`` is what no action covers: the same-batch check, building the step, the
    caller's loss and autograd, zeroing gradients, Python.

    Examples:
        >>> parts = breakdown([("STEP", 0.0, 1.0), ("F.A0.m0", 0.0, 0.3), ("B.A0.m0", 0.3, 0.8),
        ...                    ("OUTPUT.A0.m0", 0.8, 0.85), ("OPTIMIZER", 0.9, 0.95)])
        >>> {k: round(v, 2) for k, v in parts.items() if v}
        {'compute': 0.8, 'output broadcast': 0.05, 'optimizer step': 0.05, 'other': 0.1}
    """
    parts = dict.fromkeys(BREAKDOWN, 0.0)
    total = 0.0
    for name, start, end in timings:
        kind = name.split(".", 1)[0]
        if kind == "STEP":
            total += end - start
            continue
        if kind in ("F", "B"):
            part = "compute"
        elif kind.startswith("RECV"):
            part = "wait for activations and gradients"
        elif kind == "OUTPUT":
            part = "output broadcast"
        elif kind == "WAIT_AVERAGE":
            part = "wait for the exchange"
        elif kind == "OPTIMIZER":
            part = "optimizer step"
        else:
            part = "posting messages"
        parts[part] += end - start
    parts["other"] = max(total - sum(parts.values()), 0.0)
    return parts


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
    indices = [rank, num_stages - 1 - rank] if method.name.startswith("pp_dualpipev") else [rank]
    stages = [pp.PipelineStage(_torch_stage(chain, bounds, i), i, num_stages, torch.device("cpu")) for i in indices]
    params = [p for s in stages for p in s.submod.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if method.name.startswith("pp_dualpipev"):
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


class _TorchStage(nn.Module):
    """A stage for torch's pipelining whose output is never a view: ``ScheduleDualPipeV``'s split backward calls
    ``detach_()`` on the stage output, which torch refuses for a view (a stage ending in ``flatten``, as VGG-16's
    does at some balanced cuts); a user works around it the same way, with a copy (a few KB here)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.stage(x)
        return out.clone() if out._base is not None else out


def _torch_stage(chain: Chain, bounds: list[int], index: int) -> nn.Module:
    """Stage ``index`` of ``chain`` cut at ``bounds``, for torch's pipelining."""
    return _TorchStage(chain.stage_module(bounds[index], bounds[index + 1]))


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
    os.environ.update(dict(spec.env))
    torch.set_num_threads(spec.threads)
    net = build(model, size)
    net.train()
    pipe: Pipeline | None = None
    drain: Callable[[], None] | None = None
    optimizer: _TimedSGD | None = None
    if method.startswith(("single", "ddp")):
        # DDP as a competent user sets it: gradients as views of the buckets (no copy), the bucket size swept.
        options = {"gradient_as_bucket_view": True, "bucket_cap_mb": spec.bucket_mib} if world > 1 else {}
        step, _ = plain_step(net, rank, world, **options)
    elif method.startswith("pp_"):
        step = _torch_pipelining(rank, world, net, spec, cuts)
    else:
        step, pipe, drain, optimizer = _ours(rank, world, net, spec, cuts, forward_cuts)
    data = make_batches(steps + 1, batch_size, size)
    step(*data[0])  # warm-up
    seconds, compute, last_timings, copies = [], [], [], 0
    parts: list[dict[str, float]] = []
    for _ in range(repeats):
        _barrier(world)
        start = time.perf_counter()
        for x, y in data[1:]:
            if pipe is not None:
                pipe.executor.timings = []
            if optimizer is not None:
                optimizer.timings = []
            begin = time.perf_counter()
            step(x, y)
            if pipe is not None and pipe.executor.timings is not None:
                last_timings = [("STEP", begin, time.perf_counter()), *pipe.executor.timings]
                compute.append(compute_fraction(pipe.executor.timings, begin, time.perf_counter()))
                parts.append(breakdown([*last_timings, *(optimizer.timings if optimizer is not None else [])]))
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
        "breakdown_s": {k: statistics.median(p[k] for p in parts) for k in BREAKDOWN} if parts else None,
    }


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
