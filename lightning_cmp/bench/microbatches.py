"""Micro-batched ``cmp`` against the pipelines a user would pick instead: projected for K=2..8, measured for small K.

``python -m lightning_cmp.bench.microbatches --model vgg --out docs/bench/microbatches.json`` prints two tables and
writes the JSON the docs' tables are made from.

**Projection.** Every block's forward and backward are timed (one process, one thread) at every microbatch size a
schedule runs, then each schedule is simulated with the same stage costs at each of its microbatch counts, and
the best count is kept: ``cmp`` (ours, N microbatches per replica: 1, 2, 4, 8), gpipe (ours, M = 2..16) and
torch.distributed.pipelining's Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble and
ScheduleDualPipeV (their own execution order, `torch_schedules`; M = 2..16 where torch accepts it; the
zero-bubble schedules' input-gradient half of a backward is taken as half its cost, the weight half the rest). One-stage
schedules are cut into K balanced stages, two-stage ones (Interleaved, ZBV, DualPipeV) into 2K. ``cmp``'s mirror
exchange of the largest stage's gradients is added (measured per byte); activation messages, the other schedules'
gradient traffic and the optimizer step are not modelled (the same for all). Memory is the simulators' peak
activations: the share of the batch held between a stage's forward and its backward on the busiest rank (for
two-stage schedules halved, a virtual stage being about half a rank's layers). Block timings on a shared
2-core machine move by several per cent, so the blocks are profiled ``--profiles`` times (3), each profile is
projected, and per K the run with the median ``cmp vs best other`` ratio is shown with the ratio's spread. The
last column bounds what ``cmp`` could gain from removing all its idle time (the busiest worker's compute at the
best N), e.g. by splitting each backward into input and weight parts as the zero-bubble schedules do.

**Measured.** The same model trains through this package's runtime on K processes (gloo, 1 thread each) with
``mp``, ``gpipe`` (M=4) and ``cmp`` with N = 1, 2, 4: median step time of ``--repeats`` runs of ``--steps`` steps.
This machine has 2 cores: K = 3, 4 run more processes than cores, so those rows show scheduling, not speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.bench.machine import machine
from lightning_cmp.bench.methods import run_method
from lightning_cmp.bench.models import build, make_batches
from lightning_cmp.bench.project import block_costs, exchange_seconds_per_byte, param_bytes
from lightning_cmp.bench.report import write_json
from lightning_cmp.bench.torch_schedules import num_virtual_stages, simulate_order, torch_order
from lightning_cmp.partition import resolve_cuts, stage_pass_costs, trace_chain
from lightning_cmp.schedule import get_schedule

__all__ = ["main", "project", "tables", "tables_from_json"]

CMP_N = (1, 2, 4, 8)
OTHER_M = (2, 4, 8, 16)
TORCH = ("Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleZBVZeroBubble", "ScheduleDualPipeV")
MEASURED = ("mp", "gpipe4", "cmp", "cmp2", "cmp4")

BlockCosts = dict[int, list[tuple[float, float]]]


def _ours(name: str, k: int, n: int, costs: BlockCosts, batch: int, cuts: list[int], average: float) -> dict:
    spec = get_schedule(name)
    replicas = spec.num_replicas
    forward, backward = stage_pass_costs(costs[batch // (replicas * n)], cuts, replicas * n)
    # ordered for the measured costs, as the strategy does with the balanced partition's profile
    result = spec.simulate(n, (forward, backward), average=average)
    return {
        "step_s": result.makespan,
        "peak_activations": max(result.peak_activations.values()),
        "busy_s": max(result.busy.values()),  # the step without idle time: the busiest worker's compute
    }


def _torch(name: str, k: int, m: int, costs: BlockCosts, batch: int, whole: list[float]) -> dict | None:
    stages = num_virtual_stages(name, k)
    if stages > len(whole):
        return None
    cuts = resolve_cuts("balanced", len(whole), stages, whole)
    forward, backward = stage_pass_costs(costs[batch // m], cuts, m)
    try:
        order = torch_order(name, k, m)
    except ValueError:  # torch refuses this microbatch count
        return None
    sim = simulate_order(order, name, k, m, forward, backward)
    share = 0.5 if stages == 2 * k else 1.0
    return {"step_s": sim.makespan, "peak_activations": share * max(sim.peak_activations.values())}


def project(costs: BlockCosts, batch: int, exchange_per_byte: float, params: list[int], ks: range) -> dict[int, Any]:
    """Per K: every schedule's best microbatch count, its simulated step time and peak activations."""
    whole = [f + b for f, b in costs[batch]]
    out: dict[int, Any] = {}
    for k in ks:
        if 2 * k > len(whole):
            break
        cuts = resolve_cuts("balanced", len(whole), k, whole)
        bounds = [0, *cuts, len(whole)]
        average = exchange_per_byte * max(sum(params[a:b]) for a, b in pairwise(bounds))
        row: dict[str, Any] = {}
        candidates: dict[str, dict[int, dict | None]] = {
            "cmp": {n: _ours("cmp", k, n, costs, batch, cuts, average) for n in CMP_N if batch // (2 * n) in costs},
            "gpipe": {m: _ours("gpipe", k, m, costs, batch, cuts, 0.0) for m in OTHER_M if batch // m in costs},
        }
        for name in TORCH:
            candidates[name] = {m: _torch(name, k, m, costs, batch, whole) for m in OTHER_M if batch // m in costs}
        for name, runs in candidates.items():
            done = {m: r for m, r in runs.items() if r is not None}
            best = min(done, key=lambda m: (done[m]["step_s"], done[m]["peak_activations"]))
            row[name] = {"best_microbatches": best, **done[best], "all": {str(m): r["step_s"] for m, r in done.items()}}
        others = min(v["step_s"] for n, v in row.items() if n != "cmp")
        row["cmp_vs_best_other"] = others / row["cmp"]["step_s"]
        # what cmp would take with no idle time at all (e.g. with backwards split as zero-bubble schedules do)
        cmp_runs = {n: r for n, r in candidates["cmp"].items() if r is not None}
        bound = min(cmp_runs, key=lambda n: cmp_runs[n]["busy_s"])
        row["cmp_without_idle"] = {"best_microbatches": bound, "step_s": cmp_runs[bound]["busy_s"]}
        out[k] = row
    return out


def median_rows(runs: list[dict[int, Any]]) -> dict[int, Any]:
    """Per K, the run whose ``cmp_vs_best_other`` is the median, with that ratio's spread over all runs.

    Examples:
        >>> runs = [{2: {"cmp_vs_best_other": r}} for r in (1.1, 1.3, 1.2)]
        >>> median_rows(runs)[2]
        {'cmp_vs_best_other': 1.2, 'spread': [1.1, 1.3]}
    """
    out: dict[int, Any] = {}
    for k in runs[0]:
        ordered = sorted((run[k] for run in runs), key=lambda row: row["cmp_vs_best_other"])
        ratios = [row["cmp_vs_best_other"] for row in ordered]
        out[k] = {**ordered[(len(ordered) - 1) // 2], "spread": [ratios[0], ratios[-1]]}
    return out


def measure(model: str, ks: list[int], whole: list[float], steps: int, repeats: int, batch: int, size: int) -> dict:
    """Median seconds per step of each measured method at each K (fresh worker processes per run)."""
    out: dict[int, dict[str, Any]] = {}
    for k in ks:
        cuts = resolve_cuts("balanced", len(whole), k, whole)
        out[k] = {}
        for method in MEASURED:
            started = time.perf_counter()
            try:
                per_rank = run_workers(
                    run_method, k, method=method, model=model, cuts=cuts, steps=steps, repeats=repeats,
                    batch_size=batch, size=size, timeout=600,
                )  # fmt: skip
                runs = [max(r["seconds"][i] for r in per_rank) / steps for i in range(repeats)]
                out[k][method] = {"step_s": statistics.median(runs), "runs_s": runs}
            except Exception as err:  # reported, not fatal
                out[k][method] = {"error": str(err).strip().splitlines()[-1][:160]}
            print(f"# K={k} {method}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return out


def tables_from_json(path: str | Path) -> str:
    """The docs' tables, from the JSON `main` wrote."""
    record = json.loads(Path(path).read_text())
    return tables(record["projection"], record["measured"], int(record["config"]["batch_size"]))


def tables(projection: Mapping[Any, Any], measured: Mapping[Any, Any], batch: int) -> str:
    """The two markdown tables: projected step time (best microbatch count, peak activations), measured samples/s."""
    names = ["cmp", "gpipe", *TORCH]
    short = {"Schedule1F1B": "1F1B", "ScheduleInterleaved1F1B": "Interleaved1F1B"}
    short |= {"ScheduleZBVZeroBubble": "ZBVZeroBubble", "ScheduleDualPipeV": "DualPipeV"}
    head = " | ".join(short.get(n, n) for n in names)
    lines = [f"| K | {head} | cmp vs best other (spread) | cmp without idle time |", "|---" * (len(names) + 3) + "|"]
    for k, row in projection.items():
        cells = [
            f"{row[n]['step_s']:.3f} s ({'N' if n == 'cmp' else 'M'}={row[n]['best_microbatches']}, "
            f"mem {row[n]['peak_activations']:.2f})"
            for n in names
        ]
        low, high = row.get("spread", [row["cmp_vs_best_other"]] * 2)
        ratio = f"{row['cmp_vs_best_other']:.2f}x ({low:.2f}–{high:.2f})"
        bound = row.get("cmp_without_idle")
        ideal = f"{bound['step_s']:.3f} s (N={bound['best_microbatches']})" if bound else "n/a"
        lines.append(f"| {k} | {' | '.join(cells)} | {ratio} | {ideal} |")
    lines += ["", "| K | " + " | ".join(MEASURED) + " |", "|---" * (len(MEASURED) + 1) + "|"]
    for k, row in measured.items():
        cells = [f"{batch / row[m]['step_s']:.1f}" if "step_s" in row[m] else "failed" for m in MEASURED]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.microbatches", description=__doc__)
    p.add_argument("--model", choices=["vgg", "resnet18", "tiny"], default="vgg")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure", type=int, nargs="*", default=[2, 3, 4], help="K values to measure")
    p.add_argument("--profiles", type=int, default=3, help="independent block profiles, each projected (median shown)")
    p.add_argument("--out", type=Path, default=Path("bench_out/microbatches.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    net = build(args.model)
    chain = trace_chain(net)
    x = make_batches(1, args.batch_size, args.size)[0][0]
    sizes = sorted({args.batch_size // d for d in (1, 2, 4, 8, 16)}, reverse=True)
    profiles = [block_costs(chain, x, sizes) for _ in range(args.profiles)]
    exchange, params = exchange_seconds_per_byte(), param_bytes(chain)
    runs = [project(costs, args.batch_size, exchange, params, range(2, 9)) for costs in profiles]
    projection = median_rows(runs)
    costs = profiles[0]
    whole = [f + b for f, b in costs[args.batch_size]]
    measured = measure(args.model, args.measure, whole, args.steps, args.repeats, args.batch_size, args.size)
    record = {
        "command": "python -m lightning_cmp.bench.microbatches " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "block_costs_s": [{str(n): c for n, c in p.items()} for p in profiles],
        "projection": {str(k): v for k, v in projection.items()},
        "projection_runs": [{str(k): v for k, v in run.items()} for run in runs],
        "measured": {str(k): v for k, v in measured.items()},
    }
    write_json(record, args.out)
    print(f"## {args.model}, batch {args.batch_size}: projected seconds per step (best microbatch count)\n")
    print(tables(projection, measured, args.batch_size))


if __name__ == "__main__":
    main()
