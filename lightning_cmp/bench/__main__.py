"""``python -m lightning_cmp.bench``: train one CNN a fixed number of steps with every method and report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cmp.bench.ideal import compute_profile, ideal_step
from lightning_cmp.bench.launch import run_workers
from lightning_cmp.bench.machine import machine
from lightning_cmp.bench.measure import summarize
from lightning_cmp.bench.methods import METHODS, run_method
from lightning_cmp.bench.models import build, make_batches
from lightning_cmp.bench.project import (
    PROJECTED,
    StepModel,
    activation_bytes,
    block_costs,
    exchange_seconds_per_byte,
    optimizer_seconds_per_byte,
    param_bytes,
    predict,
    send_model,
    send_seconds,
)
from lightning_cmp.bench.report import write_json
from lightning_cmp.bench.summary import plot_record, tables
from lightning_cmp.partition import Chain, resolve_cuts, trace_chain
from lightning_cmp.schedule import get_schedule

#: One of each family, to keep ``--quick`` under two minutes on two busy cores.
QUICK_METHODS = ["single", "mp", "gpipe2", "cmp", "cmp2", "pp_gpipe", "pp_dualpipev", "ddp"]
#: What runs by default: every synchronous method and setting; the asynchronous schedules and micro-batched ``cmp``
#: have benchmarks of their own (``lightning_cmp.bench.asynchronous``, ``lightning_cmp.bench.microbatches``).
DEFAULT_METHODS = [
    name for name in METHODS if name not in ("spectrain", "pipedream", "async", "cmp2", "cmp4")
]  # fmt: skip
#: Methods timed through ``L.Trainer`` with ``--trainer`` (names of `lightning_cmp.bench.trainer`).
TRAINER_METHODS = ["single", "single_2threads", "ddp", "mp", "cmp", "cmp_gloo"]
MODEL_CHOICES = ["vgg", "resnet18", "resnet18_cifar", "tiny", "torchvision:resnet50", "torchvision:vgg16"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny model, 16x16 input, 1 step x 3 repeats (CI)")
    p.add_argument("--model", choices=MODEL_CHOICES, default="resnet18")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of --steps steps in each launch")
    p.add_argument("--rounds", type=int, default=1, help="launches per method, interleaved over the methods")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default: DEFAULT_METHODS")
    p.add_argument(
        "--trainer", nargs="*", default=None, choices=TRAINER_METHODS,
        help="also time these methods through L.Trainer (no names: all of them)",
    )  # fmt: skip
    p.add_argument("--trainer-steps", type=int, default=8)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.repeats, args.size, args.batch_size = "tiny", 1, 3, 16, 16
        args.methods = args.methods or QUICK_METHODS
    args.methods = args.methods or DEFAULT_METHODS
    args.trainer = [] if args.trainer is None else args.trainer or TRAINER_METHODS
    return args


def method_cuts(name: str, chain: Chain, batch_size: int, costs: dict[int, list[tuple[float, float]]]) -> list[int]:
    """The balanced cut for ``name``, from block costs at the batch size its stages run at (a schedule with M
    microbatches is balanced for B/M rows, not for B); DualPipeV cuts 4 stages for its V."""
    method = METHODS[name]
    rows = batch_size // method.microbatch_rows
    profile = costs.get(rows, costs[batch_size])
    stages = 4 if name.startswith("pp_dualpipev") else 2
    return resolve_cuts("balanced", chain.num_blocks, stages, [f + b for f, b in profile])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    before = machine()
    x = make_batches(1, args.batch_size, args.size)[0][0]
    model = build(args.model, args.size)
    chain = trace_chain(model)
    sizes = {args.batch_size // (get_schedule(s).num_replicas * m) for _, s, m in PROJECTED}
    sizes |= {args.batch_size // METHODS[n].microbatch_rows for n in args.methods}
    sizes = {n for n in sizes if n >= 1} | {args.batch_size, args.batch_size // 2}
    costs = block_costs(chain, x, sorted(sizes, reverse=True))
    print(f"# block costs: {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    profile = compute_profile(args.model, args.batch_size, args.size, sorted(sizes, reverse=True))
    cuts = {name: method_cuts(name, chain, args.batch_size, costs) for name in args.methods}
    per_method: dict[str, list[dict[str, Any]]] = {name: [] for name in args.methods}
    timelines: dict[str, Any] = {}
    for _ in range(args.rounds):  # rounds interleaved: the machine's drift hits every method alike
        for name in args.methods:
            row, per_rank = measure_method(name, args, cuts[name])
            per_method[name].append(row)
            if per_rank is not None and name in ("mp", "cmp"):
                timelines[name] = [r["timings"] for r in per_rank]
    rows = [merge_rounds(per_method[name]) for name in args.methods]
    for row in rows:
        add_ideal(row, profile, args.batch_size)
    ddp = best_of(rows).get("torch DDP")
    bucket = METHODS[ddp["method"]].bucket_mib if ddp else None  # Lightning's ddp gets the raw sweep's best bucket
    trainer = measure_trainer(args, profile, bucket)
    step = step_model(args.batch_size, chain, model, costs, x, profile)
    predicted = predict(step, range(2, 9))
    # the projection before its calibration (blocks timed one at a time, no co-run slowdown), for the record
    uncalibrated = predict(dataclasses.replace(step, whole=None, corun=1.0), range(2, 3))
    measured = {r["method"]: r["step_s"] for r in rows if "step_s" in r}
    record = {
        "command": "python -m lightning_cmp.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": before,
        "memory": "peak RSS (ru_maxrss) of each worker; every method runs in fresh processes",
        "timed_region": TIMED_REGION,
        "cuts": cuts,
        "stage_costs": stage_cost_rows(costs, cuts.get("mp", next(iter(cuts.values()))), args.batch_size),
        "compute_profile": profile,
        "rows": rows,
        "best_of": best_of(rows),
        "trainer": trainer,
        "projection_s_per_step": predicted,
        "projection_error": {n: p[2] / measured[n] for n, p in predicted.items() if n in measured and 2 in p},
        "projection_error_uncalibrated": {
            n: p[2] / measured[n] for n, p in uncalibrated.items() if n in measured and 2 in p
        },
        "timelines": timelines,
        "wall_s": time.perf_counter() - started,
    }
    write_json(record, args.out / "bench.json")
    plot_record(record, args.out)
    print(tables(record))
    return record


#: What every raw row's timer covers (the docs quote it).
TIMED_REGION = (
    "from a barrier before the first of --steps steps to a barrier after the last: per step the forward, the loss, "
    "the backward, the gradient exchange or all-reduce, zeroing the gradients and the optimizer step; the batches "
    "are made before the timer starts (no data loading), one warm-up step runs before it, process start-up and "
    "model building are outside it; Trainer rows: from one on_train_batch_start to the next (data loading from an "
    "in-memory TensorDataset and Lightning's per-step work included)"
)


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a method's launches: the repeats of every launch together, medians over all of them."""
    done = [r for r in rounds if "samples_per_s" in r]
    if not done:
        return rounds[0]
    row = dict(done[0])
    if len(done) > 1:
        rates = [v for r in done for v in r["samples_per_s_repeats"]]
        steps = [s for r in done for s in r["step_s_repeats"]]
        row.update(samples_per_s=statistics.median(rates), samples_per_s_repeats=rates)
        row.update(step_s=statistics.median(steps), step_s_repeats=steps, launches=len(done))
    return row


def add_ideal(row: dict[str, Any], profile: dict[str, Any], batch_size: int) -> None:
    """The row's ideal step alone and co-run (`ideal.ideal_step`), and the measured step's share of each."""
    if "step_s" not in row:
        return
    for key, corun in (("ideal", False), ("corun_ideal", True)):
        ideal = ideal_step(row["method"], profile, batch_size, corun)
        row[f"{key}_s"] = ideal
        row[f"of_{key}"] = None if ideal is None else ideal / row["step_s"]


def best_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each family's fastest setting (e.g. torch's Schedule1F1B at its best M): method, label and samples/s."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        family = METHODS[r["method"]].family
        if family and "samples_per_s" in r and r["samples_per_s"] > best.get(family, {}).get("samples_per_s", 0):
            best[family] = {"method": r["method"], "label": r["label"], "samples_per_s": r["samples_per_s"]}
    return best


def measure_trainer(
    args: argparse.Namespace, profile: dict[str, Any], bucket_mib: float | None = None
) -> list[dict[str, Any]]:
    """The ``--trainer`` methods through ``L.Trainer`` (fresh processes each), repeats interleaved over methods;
    ``ddp`` with ``bucket_mib`` MiB buckets (the raw rows' best) when given."""
    if not args.trainer:
        return []
    from lightning_cmp.bench.trainer import METHODS as TRAINER
    from lightning_cmp.bench.trainer import run_trainer, summarize_trainer

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.trainer}
    for _ in range(1 if args.quick else max(args.rounds, 2)):  # --quick checks the plumbing: one run each
        for name in args.trainer:
            started = time.perf_counter()
            try:
                options = {"bucket_cap_mb": bucket_mib} if name == "ddp" and bucket_mib else {}
                runs[name].append(
                    run_trainer(name, args.model, args.batch_size, args.size, args.trainer_steps, **options)
                )
            except Exception as err:  # reported in the row, not fatal
                runs[name].append({"error": str(err).strip().splitlines()[-1][:160]})
            print(f"# trainer {name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    rows = []
    for name, found in runs.items():
        done = [r for r in found if "error" not in r]
        row: dict[str, Any] = {"method": name, "label": TRAINER[name].label}
        if name == "ddp" and bucket_mib:
            row["label"] += f" ({bucket_mib:g} MiB buckets, the raw sweep's best)"
        row.update(summarize_trainer(done, args.batch_size) if done else found[0])
        add_ideal(row, profile, args.batch_size)
        rows.append(row)
    return rows


def stage_cost_rows(
    costs: dict[int, list[tuple[float, float]]], cuts: list[int], batch_size: int
) -> dict[str, list[float]]:
    """Per batch size, each stage's forward and backward seconds (summed block costs) at the 2-stage cut."""
    bounds = [0, *cuts, len(costs[batch_size])]
    out = {}
    for rows in (batch_size, batch_size // 2):
        if rows in costs:
            blocks = costs[rows]
            out[str(rows)] = [sum(blocks[i][part] for i in range(a, b)) for a, b in pairwise(bounds) for part in (0, 1)]
    return out


def measure_method(
    name: str, args: argparse.Namespace, cuts: list[int]
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """One benchmark row: ``name`` run in fresh worker processes on ``args.model`` cut at ``cuts``, summarised;
    also what each rank returned (None when the method could not run: the row then holds the error)."""
    method = METHODS[name]
    row: dict[str, Any] = {"method": name, "label": method.label, "workers": method.world}
    started = time.perf_counter()
    per_rank = None
    try:
        per_rank = run_workers(
            run_method, method.world, method=name, model=args.model, cuts=cuts, steps=args.steps,
            repeats=args.repeats, batch_size=args.batch_size, size=args.size,
        )  # fmt: skip
        row.update(summarize(per_rank, args.steps, args.batch_size))
    except Exception as err:  # a baseline that cannot run is reported, not fatal
        row["error"] = str(err).strip().splitlines()[-1][:160]
    print(f"# {args.model} {name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return row, per_rank


def step_model(
    batch_size: int,
    chain: Chain,
    model: nn.Module,
    costs: dict[int, list[tuple[float, float]]],
    x: Tensor,
    profile: dict[str, Any] | None = None,
) -> StepModel:
    """Measure what the projection needs besides block costs: message, optimizer and exchange times; with a
    `compute_profile`, the block costs are calibrated to the whole model's measured compute (`StepModel`)."""
    sizes, params = activation_bytes(chain, x), param_bytes(chain)
    unique = sorted({*params, *(s // d for s in sizes for d in (1, 2, 4))})
    send = send_model(unique, send_seconds(unique))
    shared = os.environ.get("LIGHTNING_CMP_SHM", "1") != "0"  # what cmp's workers use on this host
    exchange = exchange_seconds_per_byte() if shared else None
    whole = None if profile is None else {int(n): t for n, t in profile["whole_s"].items()}
    corun = 1.0 if profile is None or profile.get("corun_factor") is None else float(profile["corun_factor"])
    step = optimizer_seconds_per_byte(model)
    return StepModel(batch_size, costs, sizes, params, send, step, exchange, whole, corun)


if __name__ == "__main__":
    main()
