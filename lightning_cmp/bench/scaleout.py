"""``python -m lightning_cmp.bench.scaleout``: data-parallel pipelines and Lee et al.'s sharded averaging, measured.

Side by side in one run, each method in fresh worker processes (1 thread each), medians of repeats:

* **raw** (the runtime in a plain loop): torch ``DistributedDataParallel`` on D workers, our pure data parallelism
  (``num_stages=1``) with the plain bucketed all-reduce and with Lee et al.'s sharded form, and ``cmp`` K=2 x D=2
  with both forms against DDP on the same 4 workers. Per rank and step: the averaging's bytes on the wire (ring
  algorithm: an all-reduce of ``B`` bytes over ``n`` ranks sends ``2(n-1)/n B``, a reduce-scatter or an all-gather
  ``(n-1)/n B``), the time the step spent blocked on averaging, the same collectives' time alone (replayed with
  nothing else running) and so the **overlap fraction** ``1 - blocked / alone``, and the optimizer-state bytes.
* **trainer**: the same comparisons through ``L.Trainer`` (Lightning's ``ddp`` with ``gradient_as_bucket_view``,
  ``strategy="sharded_dp"``, ``CMPStrategy(num_stages=2)``), timed per step by `lightning_cmp.bench.trainer`.
* **projection**: an alpha-beta network model (``t = alpha + beta * bytes``, fitted to measured loopback messages)
  and the measured per-layer compute give the step time of pure data parallelism (no overlap, the plain overlapped
  all-reduce, Lee et al.'s form) at 8...1024 workers with a fixed batch per worker, and the schedule simulator gives
  ``cmp`` K=2 x D pipelines' step with the plain all-reduce. What it leaves out is listed in ``docs/scaling-out.md``.

``--out`` gets ``scaleout.json`` (everything above, with the machine) and ``scaleout_projection.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.bench.machine import machine
from lightning_cmp.bench.methods import plain_step
from lightning_cmp.bench.models import build, make_batches
from lightning_cmp.bench.project import (
    activation_bytes,
    block_costs,
    optimizer_seconds_per_byte,
    param_bytes,
    send_seconds,
)
from lightning_cmp.bench.report import save_figure, write_json
from lightning_cmp.bench.trainer import METHODS, TrainerMethod, run_trainer, summarize_trainer
from lightning_cmp.partition import resolve_cuts, stage_pass_costs, trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.groups import DataGroups
from lightning_cmp.schedule import Costs, Placement, get_schedule, lower, simulate

__all__ = [
    "RAW",
    "TRAINER",
    "Raw",
    "Tap",
    "fit_alpha_beta",
    "project_data_parallel",
    "ring_bytes",
    "ring_seconds",
    "table",
    "tables_from_json",
]


# -- what a rank sends --------------------------------------------------------------------------------------------
def ring_bytes(kind: str, nbytes: int, ranks: int) -> float:
    """Bytes one rank sends for a collective over ``ranks`` ranks of an ``nbytes`` buffer, with ring algorithms.

    ``nbytes`` is the whole buffer: the all-reduce's tensor, the reduce-scatter's input, the all-gather's output.

    Examples:
        >>> ring_bytes("all_reduce", 1000, 4), ring_bytes("reduce_scatter", 1000, 4), ring_bytes("all_gather", 1000, 1)
        (1500.0, 750.0, 0.0)
    """
    share = (ranks - 1) / ranks * nbytes
    return 2 * share if kind == "all_reduce" else share


def ring_seconds(kind: str, nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """A ring collective's time under the alpha-beta model: ``steps x (alpha + beta x chunk)``, chunk = nbytes/ranks.

    Examples:
        >>> ring_seconds("all_reduce", 4e6, 4, alpha=1e-5, beta=1e-9)  # 6 steps of 1 MB
        0.00606
    """
    if ranks == 1:
        return 0.0
    steps = (ranks - 1) * (2 if kind == "all_reduce" else 1)
    return round(steps * (alpha + beta * nbytes / ranks), 12)


@dataclass
class Tap:
    """Counts one `Comm`'s collectives: what was started (kind, bytes) and how long waiting on them blocked.

    It wraps the instance's ``start_all_reduce``, ``start_reduce_scatter``, ``start_all_gather`` and ``wait``
    (collectives only: peer ``None``); `replay` times the recorded collectives again with nothing else running.
    """

    comm: Comm
    ops: list[tuple[str, int, torch.dtype]] = field(default_factory=list)
    blocked: float = 0.0
    _originals: dict[str, Callable[..., list[Any]]] = field(default_factory=dict)
    _keep: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # replay buffers outlive their collectives

    def __post_init__(self) -> None:
        comm = self.comm
        for kind in ("all_reduce", "reduce_scatter", "all_gather"):
            self._originals[kind] = getattr(comm, f"start_{kind}")
            setattr(comm, f"start_{kind}", self._recording(kind, self._originals[kind]))
        wait = comm.wait

        def timed_wait(works: Any, peer: int | None) -> None:
            if peer is not None:
                return wait(works, peer)
            start = time.perf_counter()
            wait(works, peer)
            self.blocked += time.perf_counter() - start
            return None

        comm.wait = timed_wait  # type: ignore[method-assign]

    def _recording(self, kind: str, original: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
        def start(*tensors: Tensor) -> list[Any]:
            whole = tensors[-1] if kind == "reduce_scatter" else tensors[0]  # (out, input) / (tensor) / (out, in)
            self.ops.append((kind, whole.numel() * whole.element_size(), whole.dtype))
            return original(*tensors)

        return start

    def reset(self) -> None:
        self.ops, self.blocked = [], 0.0

    def sent_bytes(self) -> float:
        return sum(ring_bytes(kind, nbytes, self.comm.size) for kind, nbytes, _ in self.ops)

    def start_replay(self) -> list[Any]:
        """Start this step's collectives again, in the same order, on fresh buffers; returns the works."""
        works: list[Any] = []
        n = self.comm.size
        for kind, nbytes, dtype in self.ops:
            whole = torch.zeros(nbytes // torch.empty(0, dtype=dtype).element_size(), dtype=dtype)
            part = torch.zeros(whole.numel() // n, dtype=dtype)
            start = self._originals[kind]
            works += start(whole) if kind == "all_reduce" else start(part, whole) if kind == "reduce_scatter" else []
            works += start(whole, part) if kind == "all_gather" else []
            self._keep.append((whole, part))
        return works


def replay_seconds(taps: list[Tap], repeats: int = 5) -> float:
    """Median time of one step's averaging collectives alone (every tap's, started together, all waited)."""
    runs = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        works = [w for tap in taps for w in tap.start_replay()]
        for work in works:
            work.wait()
        runs.append(time.perf_counter() - start)
        for tap in taps:
            tap._keep.clear()
    return statistics.median(runs)


# -- raw methods ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """One raw row: ``num_stages`` 0 is torch DDP; else our pipelines of that many stages with ``averaging``."""

    name: str
    world: int
    label: str
    num_stages: int = 0
    schedule: str = "mp"
    averaging: str = "gradient"


RAW: dict[str, Raw] = {
    r.name: r
    for r in (
        Raw("ddp2", 2, "torch DDP, 2 workers (gradient_as_bucket_view)"),
        Raw("dp_allreduce", 2, "lightning_cmp data parallel, plain all-reduce (num_stages=1, D=2)", 1),
        Raw("dp_sharded", 2, "lightning_cmp sharded_dp: Lee et al. (num_stages=1, D=2)", 1, "mp", "sharded"),
        Raw("ddp4", 4, "torch DDP, 4 workers (gradient_as_bucket_view)"),
        Raw("cmp2x2_allreduce", 4, "lightning_cmp cmp K=2 x D=2, plain all-reduce", 2, "cmp"),
        Raw("cmp2x2_sharded", 4, "lightning_cmp cmp K=2 x D=2, Lee et al.", 2, "cmp", "sharded"),
    )
}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))


def run_raw(
    rank: int,
    world: int,
    method: str,
    model: str,
    cuts: list[int],
    steps: int,
    repeats: int,
    batch_size: int,
    size: int,
    bucket_mib: float | None = None,
) -> dict[str, Any]:
    """Worker body of one raw row: a warm-up step, ``repeats`` timed runs of ``steps`` steps, then the replay.

    ``bucket_mib``: our rows' averaging buckets (None: the runtime's default, 16 MiB)."""
    spec = RAW[method]
    bucket_bytes = None if bucket_mib is None else int(bucket_mib * 2**20)
    net = build(model, size)
    net.train()
    data = make_batches(steps + 1, batch_size, size)
    taps: list[Tap] = []
    if spec.num_stages == 0:
        step, opt = plain_step(net, rank, world, gradient_as_bucket_view=True)
        local = sum(p.numel() * p.element_size() for p in net.parameters())
        groups = world
    else:
        k = spec.num_stages
        chain = trace_chain(net)
        groups = world // k
        placement = Placement(k, get_schedule(spec.schedule).num_replicas)
        data_groups = DataGroups.build(Comm.world(rank, torch.device("cpu")), k, placement)
        taps = [Tap(c) for _, c in sorted(data_groups.stages.items())]
        pipe = Pipeline(
            chain,
            cuts if k > 1 else [],
            spec.schedule,
            data_groups.pipeline,
            "gradient",
            1,
            bucket_bytes=bucket_bytes,
            data=data_groups,
        )
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        OptimizerLayout(opt, {id(p): n for n, p in net.named_parameters()}).localize(pipe)
        local = sum(p.numel() * p.element_size() for c in pipe.copies.values() for p in c.parameters())
        if spec.averaging == "sharded":
            pipe.shard(opt, bucket_bytes)
        group = data_groups.group

        def step(x: Tensor, y: Tensor) -> None:
            out = pipe(x.tensor_split(groups)[group])
            loss = F.cross_entropy(out, y.tensor_split(groups)[group])
            opt.zero_grad()
            loss.backward()
            opt.step()
            pipe.after_optimizer_step()

    step(*data[0])  # warm-up (and the optimizer's state)
    seconds, blocked, sent = [], [], []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for x, y in data[1:]:
            for tap in taps:
                tap.reset()
            step(x, y)
            blocked.append(sum(t.blocked for t in taps))
            sent.append(sum(t.sent_bytes() for t in taps))
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    alone = replay_seconds(taps) if taps else None
    if spec.num_stages == 0:
        # DDP all-reduces every gradient once per step over the D workers (ring: 2(D-1)/D of the bytes)
        sent = [ring_bytes("all_reduce", local, world)]
    return {
        "rank": rank,
        "seconds": seconds,
        "blocked_s": statistics.median(blocked) if blocked else None,
        "alone_s": alone,
        "sent_bytes": statistics.median(sent),
        "optimizer_state_bytes": _state_bytes(opt),
        "param_bytes": local,
    }


def merge_launches(launches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rank: every launch's timed run, and the median of the launches' other figures.

    Examples:
        >>> a = {"seconds": [1.0], "blocked_s": 0.1, "alone_s": 0.2, "sent_bytes": 8.0,
        ...      "optimizer_state_bytes": 4, "param_bytes": 8}
        >>> merged = merge_launches([[a], [a | {"seconds": [3.0], "blocked_s": 0.3}], [a | {"seconds": [2.0]}]])
        >>> merged[0]["seconds"], merged[0]["blocked_s"]
        ([1.0, 3.0, 2.0], 0.1)
    """
    merged = []
    for rank in range(len(launches[0])):
        runs = [launch[rank] for launch in launches]
        row = dict(runs[0])
        row["seconds"] = [s for run in runs for s in run["seconds"]]
        for key in ("blocked_s", "alone_s", "sent_bytes"):
            values = [run[key] for run in runs if run[key] is not None]
            row[key] = statistics.median(values) if values else None
        merged.append(row)
    return merged


def summarize_raw(
    method: str, per_rank: list[dict[str, Any]], steps: int, batch_size: int, bucket_mib: float | None = None
) -> dict[str, Any]:
    """One row: samples/s (median of repeats, rank 0's clock) and the per-rank averaging figures.

    Examples:
        >>> r = {"seconds": [2.0, 1.0, 1.0], "blocked_s": 0.1, "alone_s": 0.4, "sent_bytes": 8.0,
        ...      "optimizer_state_bytes": 50, "param_bytes": 100}
        >>> row = summarize_raw("dp_sharded", [r, r], steps=2, batch_size=8)
        >>> row["samples_per_s"], row["overlap"], row["optimizer_state_share"]
        (16.0, [0.75, 0.75], [0.5, 0.5])
    """
    spec = RAW[method]
    rate = [steps * batch_size / s for s in per_rank[0]["seconds"]]

    def overlap(r: dict[str, Any]) -> float | None:
        if r["alone_s"] is None or r["alone_s"] <= 0:
            return None
        return round(max(0.0, min(1.0, 1.0 - r["blocked_s"] / r["alone_s"])), 3)

    return {
        "method": method,
        "label": spec.label
        if bucket_mib is None or not spec.num_stages
        else f"{spec.label}, {bucket_mib:g} MiB buckets",
        "bucket_mib": bucket_mib if spec.num_stages else None,
        "workers": spec.world,
        "samples_per_s": statistics.median(rate),
        "samples_per_s_repeats": rate,
        "sent_mib_per_step": [round(r["sent_bytes"] / 2**20, 2) for r in per_rank],
        "blocked_s": [r["blocked_s"] for r in per_rank],
        "alone_s": [r["alone_s"] for r in per_rank],
        "overlap": [overlap(r) for r in per_rank],
        "optimizer_state_mib": [round(r["optimizer_state_bytes"] / 2**20, 2) for r in per_rank],
        "optimizer_state_share": [round(r["optimizer_state_bytes"] / r["param_bytes"], 3) for r in per_rank],
    }


# -- through the Trainer: `lightning_cmp.bench.trainer`'s methods of these names ---------------------------------
TRAINER: dict[str, TrainerMethod] = {n: METHODS[n] for n in ("ddp2", "sharded_dp2", "ddp4", "cmp2x2", "cmp2x2_sharded")}


# -- projection -----------------------------------------------------------------------------------------------------
def fit_alpha_beta(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """``t = alpha + beta * bytes`` through the measured messages: ``beta`` the slope between the two largest (where
    bandwidth dominates), ``alpha`` what is left of the smallest one's time (latency); both clamped at >= 0. A
    least-squares fit would let the large messages' noise decide the latency.

    Examples:
        >>> fit_alpha_beta([0, 1000, 2000], [1e-5, 2e-5, 3e-5])
        (1e-05, 1e-08)
    """
    points = sorted(zip(sizes, seconds, strict=True))
    (s0, t0), (s1, t1), (s2, t2) = points[0], points[-2], points[-1]
    beta = max(0.0, (t2 - t1) / (s2 - s1))
    return round(max(0.0, t0 - beta * s0), 12), round(beta, 15)


def _bucketed(params: list[int], bucket_bytes: int) -> list[tuple[int, int, int]]:
    """Blocks grouped like the runtime's buckets, last blocks first: ``(first block, stop block, bytes)``.

    Examples:
        >>> _bucketed([5, 0, 5, 5], bucket_bytes=8)
        [(2, 4, 10), (0, 2, 5)]
    """
    out: list[tuple[int, int, int]] = []
    stop, size = len(params), 0
    for i in reversed(range(len(params))):
        size += params[i]
        if size >= bucket_bytes or i == 0:
            out.append((i, stop, size))
            stop, size = i, 0
    return out


def project_data_parallel(
    forward: list[float],
    backward: list[float],
    params: list[int],
    step_per_byte: float,
    workers: int,
    alpha: float,
    beta: float,
    bucket_bytes: int = 16 << 20,
) -> dict[str, float]:
    """Seconds per step of pure data parallelism on ``workers`` (each with the measured per-block costs).

    Gradients travel in buckets of about ``bucket_bytes`` (the runtime's default), collectives one at a time:

    * ``serial``: forward, backward, then one all-reduce of every gradient, then the optimizer step;
    * ``allreduce``: each bucket's all-reduce starts when backward has produced it, the step waits for the last
      one, then the whole optimizer step;
    * ``sharded`` (Lee et al.): each bucket's reduce-scatter starts likewise, the optimizer steps 1/P of the
      weights, the all-gathers start first-layer-first and each bucket's first layer waits only for its own.

    ``compute`` is one worker's forward, backward and optimizer step: the step at perfect scaling.

    Examples:
        >>> t = project_data_parallel([1.0, 1.0], [2.0, 2.0], [100, 100], 0.0, 2, alpha=0.0, beta=0.01,
        ...                           bucket_bytes=100)
        >>> t["serial"], t["allreduce"], t["sharded"]
        (8.0, 7.0, 7.0)
    """
    total = sum(params)
    opt = step_per_byte * total
    buckets = _bucketed(params, bucket_bytes)

    def backward_network(kind: str) -> float:
        """When the last bucket's collective ends (or backward, if later); buckets complete last-first."""
        now, network, done = sum(forward), 0.0, len(backward)
        for first, _, nbytes in buckets:
            now += sum(backward[first:done])
            done = first
            network = max(network, now) + ring_seconds(kind, nbytes, workers, alpha, beta)
        return max(now, network)

    serial = sum(forward) + sum(backward) + ring_seconds("all_reduce", total, workers, alpha, beta) + opt
    allreduce = backward_network("all_reduce") + opt
    reduced = backward_network("reduce_scatter") + opt / workers
    # the next forward: each bucket's first block waits for its gather, issued first-layer-first from time 0
    network, now, at = 0.0, 0.0, 0
    for first, stop, nbytes in reversed(buckets):
        network += ring_seconds("all_gather", nbytes, workers, alpha, beta)
        now = max(now + sum(forward[at:first]), network)
        now += sum(forward[first:stop])
        at = stop
    exposed = now - sum(forward)
    compute = sum(forward) + sum(backward) + opt
    return {"serial": serial, "allreduce": allreduce, "sharded": reduced + exposed, "compute": compute}


def _project_cmp_groups(
    forward_blocks: list[float],
    backward_blocks: list[float],
    params: list[int],
    activations: list[int],
    step_per_byte: float,
    groups: int,
    alpha: float,
    beta: float,
) -> float:
    """cmp K=2 pipelines x ``groups``: the simulator's step with each stage's all-reduce over its 2D copies."""
    costs = list(zip(forward_blocks, backward_blocks, strict=True))
    cuts = resolve_cuts("balanced", len(costs), 2, [f + b for f, b in costs])
    forward, backward = stage_pass_costs(costs, cuts, 2)
    bounds = [0, *cuts, len(params)]
    stage_bytes = [sum(params[a:b]) for a, b in pairwise(bounds)]
    message = activations[cuts[0] - 1] // 2
    average = max(ring_seconds("all_reduce", b, 2 * groups, alpha, beta) for b in stage_bytes)
    placement = Placement(2, 2)
    spec = get_schedule("cmp")
    program = lower(spec.build(2, 1, placement), placement, 1, average_gradients=True)
    send = alpha + beta * message
    makespan = simulate(program, placement, 1, Costs(forward, backward, send, average=average)).makespan
    return makespan + step_per_byte * sum(stage_bytes)


# -- main -----------------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.scaleout", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["vgg", "resnet18", "tiny"], default="vgg")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (every method the same)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--raw", nargs="*", choices=list(RAW), default=None, help="default: all")
    p.add_argument("--trainer", nargs="*", choices=list(TRAINER), default=None, help="default: all")
    p.add_argument("--trainer-steps", type=int, default=10)
    p.add_argument(
        "--bucket-mib", nargs="+", type=float, default=[16.0], help="our raw rows, once per averaging bucket size"
    )
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2, 8, 32, 128, 512, 1024])
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--quick", action="store_true", help="tiny model, 1 step x 2 repeats, no Trainer rows (CI)")
    p.add_argument("--replot", type=Path, help="only redraw the figure from this JSON into --out")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.repeats, args.size, args.batch_size = "tiny", 1, 2, 16, 16
        args.trainer = args.trainer or []
    args.raw = list(RAW) if args.raw is None else args.raw
    args.trainer = list(TRAINER) if args.trainer is None else args.trainer
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    record: dict[str, Any]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        record = json.loads(args.replot.read_text())
        plot_projection(record, args.out / "scaleout_projection.png")
        return record
    torch.set_num_threads(1)
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {**machine(), "note": "4-worker rows run 4 processes on these cores: compare ratios"},
        "raw": [],
        "trainer": [],
    }
    # cmp's two stages: balanced on the measured costs of the rows each replica runs
    chain = trace_chain(build(args.model, args.size))
    rows = args.batch_size // 4
    x = make_batches(1, rows, args.size)[0][0]
    cuts = resolve_cuts("balanced", chain.num_blocks, 2, [f + b for f, b in block_costs(chain, x, [rows])[rows]])
    record["config"]["cmp_cuts"] = cuts
    runs = [(n, b) for n in args.raw for b in (args.bucket_mib if RAW[n].num_stages else [None])]
    launches: dict[tuple[str, float | None], list[list[dict[str, Any]]]] = {run: [] for run in runs}
    for repeat in range(args.repeats):  # one launch per repeat, interleaved: the machine's drift hits all alike
        for name, bucket_mib in runs:
            per_rank = run_workers(
                run_raw, RAW[name].world, timeout=900, method=name, model=args.model, cuts=cuts, steps=args.steps,
                repeats=1, batch_size=args.batch_size, size=args.size, bucket_mib=bucket_mib,
            )  # fmt: skip
            launches[name, bucket_mib].append(per_rank)
            print(f"raw {name} ({bucket_mib} MiB) repeat {repeat}: {per_rank[0]['seconds'][0]:.3f} s", flush=True)
    for (name, bucket_mib), done in launches.items():
        row = summarize_raw(name, merge_launches(done), args.steps, args.batch_size, bucket_mib)
        record["raw"].append(row)
    trainer_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.trainer}
    for repeat in range(args.repeats if args.trainer else 0):
        for name in args.trainer:  # repeats interleaved: the machine's drift hits every method alike
            run = run_trainer(name, args.model, args.batch_size, args.size, args.trainer_steps)
            trainer_runs[name].append(run)
            print(f"trainer {name} repeat {repeat}: {statistics.median(run['step_s']):.3f} s/step", flush=True)
    for name, measured in trainer_runs.items():
        if measured:
            row = {"method": name, "label": TRAINER[name].label, "workers": TRAINER[name].workers}
            record["trainer"].append(row | summarize_trainer(measured, args.batch_size))
    record["projection"] = _projection(args)
    print(table(record))
    write_json(record, args.out / "scaleout.json")
    plot_projection(record, args.out / "scaleout_projection.png")
    return record


def _projection(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]
    seconds = send_seconds(sizes)
    alpha, beta = fit_alpha_beta(sizes, seconds)
    model = build(args.model, args.size)
    chain = trace_chain(model)
    per_worker = max(1, args.batch_size // 2)  # the measured runs' batch per worker at D = 2, kept fixed (weak)
    x = make_batches(1, per_worker, args.size)[0][0]
    costs = block_costs(chain, x, [per_worker])[per_worker]
    forward, backward = [f for f, _ in costs], [b for _, b in costs]
    params = param_bytes(chain)
    step_per_byte = optimizer_seconds_per_byte(model)
    # a cmp pipeline of 2 workers takes 2 x per_worker rows, per_worker per replica: the same per-block costs
    acts = activation_bytes(chain, make_batches(1, 2 * per_worker, args.size)[0][0])
    rows = []
    for p in args.workers:
        t = project_data_parallel(forward, backward, params, step_per_byte, p, alpha, beta)
        row = {"workers": p, **{k: round(v, 5) for k, v in t.items()}}
        if p >= 2 and p % 2 == 0:
            cmp = _project_cmp_groups(forward, backward, params, acts, step_per_byte, p // 2, alpha, beta)
            row["cmp_k2"] = round(cmp, 5)
        rows.append(row)
    return {
        "alpha_s": alpha,
        "beta_s_per_byte": beta,
        "message_bytes": sizes,
        "message_s": seconds,
        "batch_per_worker": per_worker,
        "param_bytes": sum(params),
        "rows": rows,
    }


def table(record: dict[str, Any]) -> str:
    """The Markdown tables of a record: raw rows, Trainer rows (with the ratio to the ddp row on as many workers)
    and the projection (efficiency: one worker's step over the projected step, with the same batch per worker)."""
    lines = [
        "| method | workers | samples/s: median (min-max) | MiB sent per rank per step | averaging alone, ms | overlap "
        "| optimizer state (share) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cells(values: list[Any], pattern: str) -> str:
        return " / ".join("n/a" if v is None else pattern.format(v) for v in values)

    def spread(row: dict[str, Any]) -> str:
        return f"{min(row['samples_per_s_repeats']):.0f}-{max(row['samples_per_s_repeats']):.0f}"

    for r in record["raw"]:
        alone = cells([None if a is None else a * 1e3 for a in r["alone_s"]], "{:.0f}")
        lines.append(
            f"| {r['label']} | {r['workers']} | {r['samples_per_s']:.1f} ({spread(r)}) "
            f"| {cells(r['sent_mib_per_step'], '{:.1f}')} "
            f"| {alone} | {cells(r['overlap'], '{:.2f}')} | {cells(r['optimizer_state_share'], '{:.2f}')} |"
        )
    if record["trainer"]:
        lines += [
            "",
            "| through the Trainer | workers | samples/s (median) | vs ddp | repeats |",
            "|---|---|---|---|---|",
        ]
        ddp = {r["workers"]: r["samples_per_s"] for r in record["trainer"] if r["method"].startswith("ddp")}
        for r in record["trainer"]:
            reps = " / ".join(f"{s:.1f}" for s in r["samples_per_s_repeats"])
            ratio = f"{r['samples_per_s'] / ddp[r['workers']]:.2f}" if r["workers"] in ddp else "n/a"
            lines.append(f"| {r['label']} | {r['workers']} | {r['samples_per_s']:.1f} | {ratio} | {reps} |")
    proj = record["projection"]
    lines += [
        "",
        "| workers | no overlap | all-reduce overlapped | Lee et al. | cmp K=2 x D (all-reduce, simulated) |",
        "|---|---|---|---|---|",
    ]
    for r in proj["rows"]:
        ideal = r["compute"]
        cmp = f"{ideal / r['cmp_k2']:.2f}" if "cmp_k2" in r else ""
        lines.append(
            f"| {r['workers']} | {ideal / r['serial']:.2f} | {ideal / r['allreduce']:.2f} | "
            f"{ideal / r['sharded']:.2f} | {cmp} |"
        )
    return "\n".join(lines)


def tables_from_json(path: str | Path) -> str:
    """The docs' tables from the JSON `main` wrote, with the network model's fit and the machine."""
    record = json.loads(Path(path).read_text())
    proj, machine = record["projection"], record["machine"]
    facts = (
        f"Fitted on this machine's loopback messages: alpha = {proj['alpha_s'] * 1e6:.0f} us, "
        f"1/beta = {1 / proj['beta_s_per_byte'] / 1e9:.2f} GB/s; {proj['batch_per_worker']} samples per worker, "
        f"{proj['param_bytes'] / 2**20:.1f} MiB of weights. Machine: {machine['platform']}, {machine['cpus']} CPUs, "
        f"torch {machine['torch']}, 1 thread per worker."
    )
    return table(record) + "\n\n" + facts


def plot_projection(record: dict[str, Any], path: Path) -> Path:
    """Projected speedup over one worker (``P x efficiency``) for each form, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["projection"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ps = [r["workers"] for r in rows]
    ax.plot(ps, ps, "k:", label="linear")
    for key, label in (("serial", "no overlap"), ("allreduce", "all-reduce overlapped"), ("sharded", "Lee et al.")):
        ax.plot(ps, [r["workers"] * r["compute"] / r[key] for r in rows], marker="o", label=label)
    cmp = [r for r in rows if "cmp_k2" in r]
    ax.plot([r["workers"] for r in cmp], [r["workers"] * r["compute"] / r["cmp_k2"] for r in cmp], marker="s",
            label="cmp K=2 x D (all-reduce)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("projected speedup over 1 worker")
    ax.set_title("same batch per worker (weak scaling)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
