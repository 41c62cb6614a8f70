"""``python -m lightning_cmp.bench``: train one CNN a fixed number of steps with every method and report."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cmp.bench.launch import run_workers
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
from lightning_cmp.bench.report import bar_chart, markdown_table, projection_table, write_json
from lightning_cmp.bench.timeline import plot_timelines
from lightning_cmp.partition import Chain, resolve_cuts, trace_chain
from lightning_cmp.schedule import get_schedule

#: One of each family, to keep ``--quick`` under two minutes on two busy cores.
QUICK_METHODS = ["single", "mp", "gpipe2", "cmp", "cmp2", "pp_gpipe", "pp_dualpipev", "ddp"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny model, 16x16 input, 1 step x 3 repeats (CI)")
    p.add_argument("--model", choices=["vgg", "resnet18", "tiny"], default="resnet18")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default: all")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.repeats, args.size, args.batch_size = "tiny", 1, 3, 16, 16
        args.methods = args.methods or QUICK_METHODS
    args.methods = args.methods or list(METHODS)
    return args


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads_per_worker": 1,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    x = make_batches(1, args.batch_size, args.size)[0][0]
    model = build(args.model)
    chain = trace_chain(model)
    sizes = {args.batch_size // (get_schedule(s).num_replicas * m) for _, s, m in PROJECTED}
    costs = block_costs(chain, x, sorted(sizes, reverse=True))
    whole = [f + b for f, b in costs[args.batch_size]]
    cuts = resolve_cuts("balanced", chain.num_blocks, 2, whole)
    cuts4 = resolve_cuts("balanced", chain.num_blocks, 4, whole)
    rows: list[dict[str, Any]] = []
    timelines: dict[str, Any] = {}
    for name in args.methods:
        row, per_rank = measure_method(name, args, cuts4 if name == "pp_dualpipev" else cuts)
        if per_rank is not None and name in ("mp", "cmp"):
            timelines[name] = [r["timings"] for r in per_rank]
        rows.append(row)
    predicted = predict(step_model(args.batch_size, chain, model, costs, x), range(2, 9))
    measured = {r["method"]: r["step_s"] for r in rows if "step_s" in r}
    table = markdown_table(rows)
    projection = projection_table(predicted, measured, 2)
    record = {
        "command": "python -m lightning_cmp.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "memory": "peak RSS (ru_maxrss) of each worker; every method runs in fresh processes",
        "cuts": {"2 stages": cuts, "4 stages (DualPipeV)": cuts4},
        "rows": rows,
        "projection_s_per_step": predicted,
        "timelines": timelines,
    }
    write_json(record, args.out / "bench.json")
    bar_chart(rows, args.out / "throughput.png", f"{args.model}, batch {args.batch_size}, 2 CPU workers x 1 thread")
    if timelines:
        plot_timelines(timelines, args.out / "timeline.png")
    print(f"## {args.model}, global batch {args.batch_size}, {args.size}x{args.size}, cuts {cuts}\n")
    print(table)
    print("\n## Projection: seconds per step (simulator with measured stage costs) vs measured\n")
    print(projection)


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
    batch_size: int, chain: Chain, model: nn.Module, costs: dict[int, list[tuple[float, float]]], x: Tensor
) -> StepModel:
    """Measure what the projection needs besides block costs: message, optimizer and exchange times."""
    sizes, params = activation_bytes(chain, x), param_bytes(chain)
    unique = sorted({*params, *(s // d for s in sizes for d in (1, 2, 4))})
    send = send_model(unique, send_seconds(unique))
    shared = os.environ.get("LIGHTNING_CMP_SHM", "1") != "0"  # what cmp's workers use on this host
    exchange = exchange_seconds_per_byte() if shared else None
    return StepModel(batch_size, costs, sizes, params, send, optimizer_seconds_per_byte(model), exchange)


if __name__ == "__main__":
    main()
