"""Accuracy run: the quickstart's ResNet-18 on Fashion-MNIST with single device, ddp, mp and cmp, side by side.

``python -m lightning_cmp.bench.accuracy --epochs 1 --limit-train 10000`` runs
``python -m lightning_cmp.quickstart`` once per method (fresh processes, same seed and data) and prints
each method's final test accuracy and training throughput as a Markdown table. ``--seeds 0 1 2`` repeats
every method per seed and adds the mean, spread and mean gap to single device over the seeds; the command
exits 1 if a run failed. Every method trains on the quickstart's global batch of 64 (``ddp``: 32 per worker).

Time to accuracy: ``--val-every N`` validates every N training steps (the quickstart's ``--val-every``), and the
table and figure (`lightning_cmp.bench.time_to_accuracy`) show how soon each method reaches a validation accuracy,
on wall time since fit started (validation included; the table says how much of it). The docs' figures come from
this command (one epoch of the 55,000 training images is 860 steps, so 10 validations per run; about 12 minutes
on the 2-core machine for the one seed; ``--seeds 0 1 2`` gives medians over three)::

    python -m lightning_cmp.bench.accuracy --runs "single device" ddp mp "cmp (gradient)" \\
        --epochs 1 --limit-train 0 --limit-eval 2000 --val-every 86 --seeds 0 \\
        --json docs/bench/time_to_accuracy.json --plot docs/img/time_to_accuracy.png

``--json docs/bench/time_to_accuracy.json --plot docs/img/time_to_accuracy.png --plot-only`` redraws the figure and
prints the time-to-accuracy table again.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_cmp.bench.machine import machine
from lightning_cmp.bench.time_to_accuracy import lacks_curves, plot_time_to_accuracy, time_to_accuracy_table

__all__ = [
    "RUNS",
    "Run",
    "accuracy_table",
    "main",
    "parse_curve",
    "parse_result",
    "parse_validations",
    "plot_curves",
    "summarize",
]

#: (label, quickstart arguments); the global batch is the quickstart's 64 everywhere
RUNS: dict[str, list[str]] = {
    # one process with torch's default threads: every core of the machine
    "single device": ["--strategy", "auto", "--devices", "1"],
    # Lightning's DDP: each of the 2 workers takes half the batch
    "ddp": ["--strategy", "ddp", "--devices", "2", "--batch-size", "32"],
    "mp": ["--strategy", "mp", "--devices", "2"],
    "cmp (gradient)": ["--strategy", "cmp", "--devices", "2"],
    "cmp (parameter, every 4)": [
        "--strategy",
        "cmp",
        "--devices",
        "2",
        "--averaging",
        "parameter",
        "--average-every",
        "4",
    ],
    "spectrain": ["--strategy", "spectrain", "--devices", "2"],
    "pipedream": ["--strategy", "pipedream", "--devices", "2"],
    "async": ["--strategy", "async", "--devices", "2"],
}


def parse_result(stdout: str) -> dict[str, float | None]:
    """Test accuracy and samples/s from the quickstart's output.

    Examples:
        >>> parse_result("test accuracy: 0.8123\\ntraining throughput: 51.2 samples/s\\n")
        {'test_acc': 0.8123, 'samples_per_s': 51.2}
    """
    acc = re.search(r"test accuracy: ([0-9.]+)", stdout)
    rate = re.search(r"training throughput: ([0-9.]+) samples/s", stdout)
    return {
        "test_acc": float(acc.group(1)) if acc else None,
        "samples_per_s": float(rate.group(1)) if rate else None,
    }


# "after epoch E" is what the quickstart printed before it printed the step and the seconds spent validating
_VALIDATION = re.compile(
    r"val accuracy after (?:step \d+ \()?epoch \d+\)?: ([0-9.]+) at ([0-9.]+) s(?: \(([0-9.]+) s validating\))?"
)


def parse_validations(stdout: str) -> list[tuple[float, float, float | None]]:
    """(seconds since fit started, validation accuracy, seconds of those spent validating or None) per validation.

    Examples:
        >>> parse_validations("val accuracy after step 86 (epoch 1): 0.8100 at 60.5 s (3.1 s validating)")
        [(60.5, 0.81, 3.1)]
        >>> parse_validations("val accuracy after epoch 1: 0.8100 at 60.5 s")
        [(60.5, 0.81, None)]
    """
    return [(float(t), float(a), float(v) if v else None) for a, t, v in _VALIDATION.findall(stdout)]


def parse_curve(stdout: str) -> list[tuple[float, float]]:
    """(seconds since fit started, validation accuracy) after every validation, from the quickstart's output.

    Examples:
        >>> parse_curve("val accuracy after epoch 1: 0.8100 at 60.5 s\\nval accuracy after epoch 2: 0.85 at 121.0 s")
        [(60.5, 0.81), (121.0, 0.85)]
        >>> parse_curve("val accuracy after step 86 (epoch 1): 0.8100 at 60.5 s (3.1 s validating)")
        [(60.5, 0.81)]
    """
    return [(t, a) for t, a, _ in parse_validations(stdout)]


def _validation_seconds(stdout: str) -> list[float]:
    """Seconds spent validating up to each point of `parse_curve`; empty where the output does not say."""
    found = [v for _, _, v in parse_validations(stdout)]
    return [v for v in found if v is not None] if None not in found else []


def _threads(stdout: str) -> int | None:
    found = re.search(r"threads per process: (\d+)", stdout)
    return int(found.group(1)) if found else None


@dataclass
class Run:
    """One training run: which method, which seed, what it reached and how long it took."""

    label: str
    seed: int
    test_acc: float | None
    samples_per_s: float | None
    wall_s: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (fit seconds, validation accuracy) each validation
    validation_s: list[float] = field(default_factory=list)  # of the fit seconds, those spent validating, per point
    processes: int | None = None
    threads: int | None = None  # per process, as the quickstart's rank 0 reported it


def summarize(runs: Sequence[Run], baseline: str = "single device") -> list[dict[str, Any]]:
    """Per method: mean and spread of the test accuracy over seeds, and the mean gap to ``baseline``.

    The gap is averaged over the seeds that both the method and the baseline finished, so it compares runs
    that saw the same initial weights and data split.

    Examples:
        >>> runs = [Run("single device", 0, 0.80, 100.0, 1.0), Run("single device", 1, 0.82, 110.0, 1.0),
        ...         Run("cmp", 0, 0.81, 50.0, 2.0), Run("cmp", 1, 0.80, 60.0, 2.0)]
        >>> [(r["label"], r["runs"], round(r["mean"], 4), round(r["gap"], 4)) for r in summarize(runs)]
        [('single device', 2, 0.81, 0.0), ('cmp', 2, 0.805, -0.005)]
    """
    labels = list(dict.fromkeys(r.label for r in runs))
    base = {r.seed: r.test_acc for r in runs if r.label == baseline and r.test_acc is not None}
    rows = []
    for label in labels:
        done = [r for r in runs if r.label == label and r.test_acc is not None]
        accs = [r.test_acc for r in done if r.test_acc is not None]
        gaps = [r.test_acc - base[r.seed] for r in done if r.test_acc is not None and r.seed in base]
        rates = [r.samples_per_s for r in done if r.samples_per_s is not None]
        rows.append(
            {
                "label": label,
                "runs": len(accs),
                "failed": sum(1 for r in runs if r.label == label) - len(accs),
                "mean": statistics.fmean(accs) if accs else None,
                "std": statistics.stdev(accs) if len(accs) > 1 else None,
                "min": min(accs) if accs else None,
                "max": max(accs) if accs else None,
                "gap": statistics.fmean(gaps) if gaps else None,
                "samples_per_s": statistics.median(rates) if rates else None,
            }
        )
    return rows


def _points(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-eval", type=int, default=0)
    p.add_argument("--val-every", type=int, default=0, help="validate every N training steps (0: after each epoch)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per method and seed")
    p.add_argument("--json", default=None, help="also write every run and the summary to this file")
    p.add_argument("--plot", default=None, help="also draw validation accuracy against wall time to this PNG")
    p.add_argument("--plot-only", action="store_true", help="only redraw --plot from the runs in --json")
    p.add_argument("--target", type=float, default=None, help="time-to-accuracy target, e.g. 0.85 (default: the "
                   "lowest final validation accuracy among the methods)")  # fmt: skip
    args = p.parse_args(argv)
    if args.plot_only:
        if not (args.json and args.plot):
            p.error("--plot-only needs --json (the runs) and --plot (the figure)")
        record = json.loads(Path(args.json).read_text())
        plot_time_to_accuracy(record, Path(args.plot), args.target)
        print(time_to_accuracy_table(record, args.target))
        return
    runs = [_run(label, seed, args) for seed in args.seeds for label in args.runs]
    _print_tables(runs, len(args.seeds) > 1)
    payload = {
        "command": "python -m lightning_cmp.bench.accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "machine": machine(),
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
    if not lacks_curves(payload):
        print("\n" + time_to_accuracy_table(payload, args.target))
        if args.plot:
            plot_time_to_accuracy(payload, Path(args.plot), args.target)
    elif args.plot:
        print(f"# no figure: {lacks_curves(payload)}", file=sys.stderr)
    if any(r.test_acc is None for r in runs):
        raise SystemExit(1)


def _run(label: str, seed: int, args: argparse.Namespace) -> Run:
    """One quickstart for ``label`` in a fresh process, with what it printed parsed."""
    common = [
        "--epochs",
        str(args.epochs),
        "--limit-train",
        str(args.limit_train),
        "--limit-eval",
        str(args.limit_eval),
    ]
    if args.val_every:
        common += ["--val-every", str(args.val_every)]
    start = time.perf_counter()
    command = [sys.executable, "-m", "lightning_cmp.quickstart", *RUNS[label], *common, "--seed", str(seed)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"# {label}, seed {seed} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    result = parse_result(proc.stdout)
    wall = time.perf_counter() - start
    print(f"# {label}, seed {seed}: {result} in {wall:.0f}s", file=sys.stderr, flush=True)
    devices = RUNS[label][RUNS[label].index("--devices") + 1]
    return Run(
        label,
        seed,
        result["test_acc"],
        result["samples_per_s"],
        wall,
        curve=parse_curve(proc.stdout),
        validation_s=_validation_seconds(proc.stdout),
        processes=int(devices),
        threads=_threads(proc.stdout),
    )


def _print_tables(runs: Sequence[Run], seeds: bool) -> None:
    print("| method | seed | test accuracy | samples/s | wall s |\n|---|---|---|---|---|")
    for run in runs:
        acc_text = f"{_points(run.test_acc)} %" if run.test_acc is not None else "failed"
        rate_text = f"{run.samples_per_s:.1f}" if run.samples_per_s is not None else "n/a"
        print(f"| {run.label} | {run.seed} | {acc_text} | {rate_text} | {run.wall_s:.0f} |")
    if not seeds:
        return
    print("\n| method | runs | mean test accuracy | std | min–max | mean gap to single device (points) |")
    print("|---|---|---|---|---|---|")
    for row in summarize(runs):
        spread = f"{_points(row['min'])}–{_points(row['max'])}"
        print(
            f"| {row['label']} | {row['runs']} | {_points(row['mean'])} % | {_points(row['std'])} | {spread} "
            f"| {_points(row['gap'], signed=True)} |"
        )


def plot_curves(record: dict[str, Any], path: Path) -> Path:
    """Validation accuracy after every validation against the seconds since fit started, one line per run (colour:
    the method), from the runs of an accuracy JSON (`plot_time_to_accuracy`: one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_cmp.bench.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(r["label"] for r in record["runs"]))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    for run in record["runs"]:
        if not run.get("curve"):
            continue
        seconds, accuracy = zip(*run["curve"], strict=True)
        first = run["seed"] == min(r["seed"] for r in record["runs"] if r["label"] == run["label"])
        ax.plot(seconds, [100 * a for a in accuracy], "o-", color=colors[run["label"]], alpha=0.8,
                label=run["label"] if first else None)  # fmt: skip
    ax.set_xlabel("seconds since fit started")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs wall time (one line per seed)")
    ax.legend()
    return save_figure(fig, path)


def accuracy_table(record: dict[str, Any]) -> str:
    """Per method: mean ± std of the test accuracy over seeds, the mean gap to single device and the median
    samples/s (Markdown), from an accuracy JSON's summary."""
    lines = [
        "| method | seeds | test accuracy, mean ± std (%) | min–max | gap to single device (points) | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["summary"]:
        spread = f"{_points(row['min'])}–{_points(row['max'])}"
        rate = f"{row['samples_per_s']:.1f}" if row.get("samples_per_s") else "n/a"
        mean = f"{_points(row['mean'])} ± {_points(row['std'])}"
        lines.append(
            f"| {row['label']} | {row['runs']} | {mean} | {spread} | {_points(row['gap'], signed=True)} | {rate} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
