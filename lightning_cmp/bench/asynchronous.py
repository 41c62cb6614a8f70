"""``python -m lightning_cmp.bench.asynchronous``: the asynchronous pipelines against what a user would use instead.

At K = 2 on this machine, side by side in one run (fresh worker processes per method, 1 thread each, median of
``--repeats`` runs of ``--steps`` steps): ``spectrain``, ``pipedream`` and ``async`` against ``mp``, ``gpipe`` (its
best M of 2, 4, 8), ``cmp``, torch pipelining ``Schedule1F1B`` (its best M) and DDP, on the benchmark's VGG-style
model and ResNet-18. Also the bytes of weight copies each worker holds (PipeDream's stashes against SpecTrain's
one prediction scratch), and a projection to K = 2..8 from block costs measured here: the steady-state time per
mini-batch of the asynchronous schedule (`lightning_cmp.schedule.steady_state`), with each stage's staleness and
SpecTrain's prediction distances, next to the projected ``mp`` and ``cmp`` steps.

``--json`` (default ``docs/bench/async.json``) keeps everything; ``--plot-only`` redraws the figure from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from lightning_cmp.bench.__main__ import measure_method, step_model
from lightning_cmp.bench.machine import machine
from lightning_cmp.bench.methods import METHODS
from lightning_cmp.bench.models import build, make_batches
from lightning_cmp.bench.project import StepModel, block_costs, predict
from lightning_cmp.bench.report import save_figure
from lightning_cmp.bench.timeline import plot_timelines
from lightning_cmp.partition import resolve_cuts, stage_pass_costs, trace_chain
from lightning_cmp.schedule import prediction_steps, steady_state

__all__ = ["FAMILIES", "main", "project_async", "tables_from_json"]

#: rows reported as one: the best of their microbatch counts
FAMILIES = {
    "gpipe (best M)": ["gpipe2", "gpipe4", "gpipe8"],
    "torch Schedule1F1B (best M)": ["pp_1f1b2", "pp_1f1b", "pp_1f1b8"],
}
METHOD_ORDER = ["single", "mp", "gpipe2", "gpipe4", "gpipe8", "cmp", "pp_1f1b2", "pp_1f1b", "pp_1f1b8", "ddp"]
ASYNCHRONOUS = ["spectrain", "pipedream", "async"]
#: methods whose last timed step is kept (each rank's executor actions) and drawn
TIMELINES = ("mp", "cmp", "spectrain")


def project_async(model: StepModel, ks: range) -> dict[int, dict[str, Any]]:
    """Per K: the asynchronous pipeline's seconds per mini-batch in the steady state (balanced cuts, measured
    block costs, each stage's optimizer step and one activation message per boundary), its fill-and-drain cost,
    the staleness of each stage (updates between a mini-batch's forward and its backward) and SpecTrain's
    prediction distances."""
    out: dict[int, dict[str, Any]] = {}
    whole = model.costs[model.batch_size]
    for k in ks:
        if k > len(whole):
            continue
        cuts = resolve_cuts("balanced", len(whole), k, [f + b for f, b in whole])
        forward, backward = stage_pass_costs(whole, cuts, 1)
        bounds = [0, *cuts, len(model.params)]
        stage_bytes = [sum(model.params[a:b]) for a, b in pairwise(bounds)]
        backward = [b + model.step_per_byte * n for b, n in zip(backward, stage_bytes, strict=True)]
        message = max(model.activations[c - 1] for c in cuts)
        state = steady_state((forward, backward), send_cost=model.send(message))
        out[k] = {
            "seconds_per_batch": state.seconds_per_batch,
            "fill_drain_s": state.fill_drain,
            "idle_fraction": [round(state.idle_fraction[r], 3) for r in range(k)],
            "staleness": [k - s - 1 for s in range(k)],
            "prediction_steps": [list(prediction_steps(k, s)) for s in range(k)],
        }
    return out


def _measure(name: str, args: argparse.Namespace, cuts: list[int]) -> dict[str, Any]:
    row, per_rank = measure_method(name, args, cuts)
    if per_rank is not None:
        row["weight_copy_bytes"] = [r.get("weight_copy_bytes", 0) for r in per_rank]
        if name in TIMELINES:  # each rank's actions in its last timed step
            row["timings"] = [r["timings"] for r in per_rank]
    return row


def _one_model(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    x = make_batches(1, args.batch_size, args.size)[0][0]
    model = build(args.model, args.size)
    chain = trace_chain(model)
    costs = block_costs(chain, x, [args.batch_size, args.batch_size // 2])
    whole = [f + b for f, b in costs[args.batch_size]]
    cuts = resolve_cuts("balanced", chain.num_blocks, 2, whole)
    rows = [_measure(name, args, cuts) for name in args.methods]
    rates = {r["method"]: r["samples_per_s"] for r in rows if "samples_per_s" in r}
    best = {}
    for family, members in FAMILIES.items():
        found = [(rates[m], m) for m in members if m in rates]
        if found:
            best[family] = {"samples_per_s": max(found)[0], "method": max(found)[1]}
    measured_model = step_model(args.batch_size, chain, model, costs, x)
    params = [sum(measured_model.params[a:b]) for a, b in pairwise([0, *cuts, chain.num_blocks])]
    return {
        "model": args.model,
        "cuts": cuts,
        "stage_param_bytes": params,
        "rows": rows,
        "best_of": best,
        "projection": {
            "async_1f1b": {str(k): v for k, v in project_async(measured_model, range(2, 9)).items()},
            "synchronous_s_per_step": {
                n: {str(k): s for k, s in v.items()} for n, v in predict(measured_model, range(2, 9)).items()
            },
        },
    }


def table(result: dict[str, Any]) -> str:
    """The throughput rows of one model, with each method's ratio to ``mp`` (Markdown)."""
    rows = {r["method"]: r for r in result["rows"]}
    mp = rows.get("mp", {}).get("samples_per_s")
    lines = [
        "| method | samples/s (median) | repeats | × mp | weight copies per worker (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name in [*METHOD_ORDER, *ASYNCHRONOUS]:
        row = rows.get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {row['label']} | failed: {row['error']} | | | |")
            continue
        rate = row["samples_per_s"]
        spread = "–".join(f"{v:.1f}" for v in (min(row["samples_per_s_repeats"]), max(row["samples_per_s_repeats"])))
        ratio = f"{rate / mp:.2f}" if mp else "n/a"
        copies = (
            " / ".join(f"{b / 2**20:.2f}" for b in row.get("weight_copy_bytes", [])) if name in ASYNCHRONOUS else ""
        )
        lines.append(f"| {row['label']} | {rate:.1f} | {spread} | {ratio} | {copies} |")
    return "\n".join(lines)


def projection_table(result: dict[str, Any]) -> str:
    """Projected seconds per mini-batch at K = 2..8 (Markdown)."""
    sync = result["projection"]["synchronous_s_per_step"]
    lines = [
        "| K | async 1F1B s/batch | mp s/step | cmp s/step | async ÷ mp | staleness per stage "
        "| SpecTrain s (forward, backward) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, row in result["projection"]["async_1f1b"].items():
        mp, cmp = sync.get("mp", {}).get(k), sync.get("cmp", {}).get(k)
        ratio = f"{row['seconds_per_batch'] / mp:.2f}" if mp else "n/a"
        mp_text = f"{mp:.3f}" if mp else "n/a"
        cmp_text = f"{cmp:.3f}" if cmp else "n/a"
        steps = " ".join(f"({f},{b})" for f, b in row["prediction_steps"])
        per_batch = f"{row['seconds_per_batch']:.3f}"
        lines.append(f"| {k} | {per_batch} | {mp_text} | {cmp_text} | {ratio} | {row['staleness']} | {steps} |")
    return "\n".join(lines)


def plot_steps(record: dict[str, Any], path: Path) -> Path:
    """The last timed step of ``TIMELINES`` on each rank, one panel per model and method (where the time goes)."""
    runs = {}
    for result in record["results"]:
        for row in result["rows"]:
            if "timings" in row:
                runs[f"{result['model']} {row['method']}"] = row["timings"]
    return plot_timelines(runs, path)


def plot(record: dict[str, Any], path: Path) -> Path:
    """Samples/s per method, one panel per model, from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        rows = {r["method"]: r for r in result["rows"] if "samples_per_s" in r}
        names = [n for n in [*METHOD_ORDER, *ASYNCHRONOUS] if n in rows]
        values = [rows[n]["samples_per_s"] for n in names]
        colors = ["tab:orange" if n in ASYNCHRONOUS else "tab:blue" for n in names]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("samples/s (median)")
        ax.set_title(f"{result['model']}, batch {record['config']['batch_size']}, K=2 (2 CPU workers x 1 thread)")
    return save_figure(fig, path)


def report(record: dict[str, Any]) -> str:
    parts = []
    for result in record["results"]:
        best = ", ".join(f"{k}: {v['method']}" for k, v in result["best_of"].items())
        parts += [f"### {result['model']} (cuts {result['cuts']}; best: {best})", "", table(result), ""]
        parts += [f"#### {result['model']}: projection from measured costs", "", projection_table(result), ""]
    return "\n".join(parts)


def tables_from_json(path: str | Path, accuracy: str | Path) -> str:
    """The docs' tables (throughput and memory per model, projection, accuracy over seeds) from the JSON files
    this benchmark and `lightning_cmp.bench.accuracy` wrote."""
    from lightning_cmp.bench.accuracy import accuracy_table

    record = json.loads(Path(path).read_text())
    runs = json.loads(Path(accuracy).read_text())
    where = record["machine"]
    head = (
        f"Machine: {where['processor']}, {where['cpus']} CPUs, torch {where['torch']}; "
        f"`{record['command']}`; timed: {record['timed']}."
    )
    args = runs["args"]
    acc_head = (
        f"`python -m lightning_cmp.bench.accuracy --epochs {args['epochs']} --limit-train {args['limit_train']} "
        f"--seeds {' '.join(map(str, args['seeds']))}` (the main job's ResNet-18 on Fashion-MNIST, one process per "
        "run; runs of one method differ only in the seed)."
    )
    return "\n".join([head, "", report(record), "### Accuracy", "", acc_head, "", accuracy_table(runs)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.asynchronous", description=__doc__)
    p.add_argument("--models", nargs="+", default=["vgg", "resnet18"], choices=["vgg", "resnet18", "tiny"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=[*METHOD_ORDER, *ASYNCHRONOUS])
    p.add_argument("--json", type=Path, default=Path("docs/bench/async.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/img/async_throughput.png"))
    p.add_argument("--timeline", type=Path, default=Path("docs/img/async_timeline.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw the figure and tables from --json")
    args = p.parse_args(argv)
    if args.plot_only:
        record = json.loads(args.json.read_text())
    else:
        results = []
        for name in args.models:
            args.model = name
            results.append(_one_model(args))
        config = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "timeline", "plot_only", "model")}
        record = {
            "command": "python -m lightning_cmp.bench.asynchronous "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": config,
            "machine": machine(),
            "timed": "each method's steps after one warm-up step; an asynchronous pipeline's drain after each run is "
            "not timed",
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=str))
    plot(record, args.plot)
    plot_steps(record, args.timeline)
    print(report(record))


if __name__ == "__main__":
    main()
