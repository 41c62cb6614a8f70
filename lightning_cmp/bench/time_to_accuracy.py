"""Time to accuracy: how soon each method of an accuracy JSON reaches a validation accuracy, as a table and a figure.

The runs come from `lightning_cmp.bench.accuracy` with ``--val-every N`` (its docstring has the command that
writes ``docs/bench/time_to_accuracy.json`` and ``docs/img/time_to_accuracy.png``). Validation ``i`` of every
seed follows the same training step, so a method's curve is, per validation, the median over seeds of the seconds
since fit started and of the accuracy. The time to a target accuracy is the first validation of that curve at or
above it: its resolution is one validation interval.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "lacks_curves",
    "median_curves",
    "plot_time_to_accuracy",
    "time_to_accuracy",
    "time_to_accuracy_table",
]

BASELINE = "single device"

#: (seconds since fit started, validation accuracy, of those seconds the ones spent validating or None)
Point = tuple[float, float, float | None]


def lacks_curves(record: dict[str, Any]) -> str | None:
    """What an accuracy JSON lacks for a time-to-accuracy figure, or None when it has a validation curve.

    Examples:
        >>> lacks_curves({"runs": [{"label": "cmp", "curve": [[60.5, 0.81]]}]}) is None
        True
        >>> lacks_curves({"runs": [{"label": "cmp", "test_acc": 0.8}]})
        'no run has a validation curve (runs made before the quickstart printed one, or that failed)'
    """
    if any(run.get("curve") for run in record.get("runs", [])):
        return None
    return "no run has a validation curve (runs made before the quickstart printed one, or that failed)"


def median_curves(record: dict[str, Any]) -> dict[str, list[Point]]:
    """Per method, per validation: the median over seeds of the fit seconds, the accuracy and the seconds spent
    validating (None where a run did not record them); as many points as the shortest curve of the method.

    Examples:
        >>> runs = [{"label": "cmp", "curve": [[10, 0.5], [20, 0.7]], "validation_s": [1, 2]},
        ...         {"label": "cmp", "curve": [[12, 0.6], [22, 0.8], [32, 0.9]], "validation_s": [1, 3, 4]}]
        >>> median_curves({"runs": runs})
        {'cmp': [(11.0, 0.55, 1.0), (21.0, 0.75, 2.5)]}
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in record["runs"]:
        if run.get("curve"):
            by_label.setdefault(run["label"], []).append(run)
    curves = {}
    for label, runs in by_label.items():
        points = min(len(run["curve"]) for run in runs)
        timed = all(len(run.get("validation_s") or []) >= points for run in runs)
        curves[label] = [
            (
                float(statistics.median(run["curve"][i][0] for run in runs)),
                float(statistics.median(run["curve"][i][1] for run in runs)),
                float(statistics.median(run["validation_s"][i] for run in runs)) if timed else None,
            )
            for i in range(points)
        ]
    return curves


def time_to_accuracy(record: dict[str, Any], target: float | None = None) -> tuple[float, list[dict[str, Any]]]:
    """The target accuracy (default: the lowest final accuracy among the methods' median curves, which every
    method reaches) and per method: its seeds, processes x threads, final accuracy, the seconds to the target
    (None if never reached), the seconds of those spent validating and the speed-up over ``BASELINE``.

    Examples:
        >>> runs = [{"label": "single device", "curve": [[10, 0.5], [20, 0.7]]},
        ...         {"label": "cmp", "curve": [[8, 0.6], [16, 0.75]]}]
        >>> target, rows = time_to_accuracy({"runs": runs})
        >>> target, [(r["label"], r["seconds"], r["speedup"]) for r in rows]
        (0.7, [('single device', 20.0, 1.0), ('cmp', 16.0, 1.25)])
    """
    curves = median_curves(record)
    if not curves:
        raise ValueError(f"no time to accuracy: {lacks_curves(record)}; rerun the accuracy benchmark with --val-every")
    goal = min(curve[-1][1] for curve in curves.values()) if target is None else target
    rows: list[dict[str, Any]] = []
    for label, curve in curves.items():
        hit = next((point for point in curve if point[1] >= goal), None)
        runs = [run for run in record["runs"] if run["label"] == label and run.get("curve")]
        rows.append(
            {
                "label": label,
                "seeds": len(runs),
                "layout": _layout(runs[0]),
                "final": curve[-1][1],
                "seconds": hit[0] if hit else None,
                "validating": hit[2] if hit else None,
            }
        )
    base = next((row["seconds"] for row in rows if row["label"] == BASELINE), None)
    for row in rows:
        row["speedup"] = base / row["seconds"] if base and row["seconds"] else None
    return goal, rows


def _layout(run: dict[str, Any]) -> str | None:
    """``"2 processes x 1 thread"`` from what the run recorded, None for runs that did not record it."""
    processes, threads = run.get("processes"), run.get("threads")
    if processes is None or threads is None:
        return None
    return f"{processes} process{'es' * (processes != 1)} x {threads} thread{'s' * (threads != 1)}"


def time_to_accuracy_table(record: dict[str, Any], target: float | None = None) -> str:
    """The Markdown table of `time_to_accuracy`.

    Examples:
        >>> runs = [{"label": "single device", "curve": [[10, 0.5], [20, 0.7]], "validation_s": [1, 2],
        ...          "processes": 1, "threads": 2}]
        >>> print(time_to_accuracy_table({"runs": runs}).splitlines()[2])
        | single device | 1 process x 2 threads | 1 | 70.00 | 20.0 | 2.0 | 1.00x |
    """
    goal, rows = time_to_accuracy(record, target)
    lines = [
        f"| method | processes x threads | seeds | final validation accuracy (%) | seconds to {100 * goal:.2f} % "
        f"| of which validating (s) | speed-up over {BASELINE} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "not reached"
        validating = f"{row['validating']:.1f}" if row["validating"] is not None else "n/a"
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "n/a"
        lines.append(
            f"| {row['label']} | {row['layout'] or 'n/a'} | {row['seeds']} | {100 * row['final']:.2f} | {seconds} "
            f"| {validating} | {speedup} |"
        )
    return "\n".join(lines)


def plot_time_to_accuracy(record: dict[str, Any], path: Path, target: float | None = None) -> Path:
    """One line per method (the median over seeds, `median_curves`): validation accuracy against seconds since fit
    started, the target of `time_to_accuracy` dashed; the title names the machine's CPU cores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_cmp.bench.report import save_figure

    goal, rows = time_to_accuracy(record, target)
    layouts = {row["label"]: row["layout"] for row in rows}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, curve) in enumerate(median_curves(record).items()):
        name = f"{label} ({layouts[label]})" if layouts[label] else label
        ax.plot([p[0] for p in curve], [100 * p[1] for p in curve], "o-", color=f"C{i}", label=name)
    ax.axhline(100 * goal, color="grey", ls="--", lw=0.8, label=f"target {100 * goal:.2f} %")
    cores = record.get("machine", {}).get("cpus")
    seeds = max(row["seeds"] for row in rows)
    where = f"{cores} CPU cores" if cores else "CPU cores not recorded"
    ax.set_title(
        f"ResNet-18 on Fashion-MNIST, global batch 64, {where}; median of {seeds} seed{'s' * (seeds != 1)}", fontsize=10
    )
    ax.set_xlabel("seconds since fit started (validation included)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
