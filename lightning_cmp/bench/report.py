"""The benchmarks' shared outputs: the projection table, the JSON record, the throughput bar chart, the fault table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["bar_chart", "fault_table", "projection_table", "save_figure", "write_json"]


def projection_table(predicted: dict[str, dict[int, float]], measured: dict[str, float], k: int) -> str:
    """Predicted seconds per step for each K, and predicted vs measured at the K that ran.

    Examples:
        >>> print(projection_table({"mp": {2: 0.5}}, {"mp": 0.6}, 2).splitlines()[2])
        | mp | 0.500 | 0.500 | 0.600 |
    """
    ks = sorted({kk for per in predicted.values() for kk in per})
    head = ["schedule", *[f"K={kk}" for kk in ks], f"predicted K={k}", f"measured K={k}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in predicted.items():
        cells = [f"{per[kk]:.3f}" if kk in per else "" for kk in ks]
        got = f"{measured[name]:.3f}" if name in measured else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per.get(k, float('nan')):.3f} | {got} |")
    return "\n".join(lines)


def write_json(record: dict[str, Any], path: Path) -> Path:
    """Write the whole benchmark record (config, machine, rows, projection) as indented JSON."""
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a Matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def bar_chart(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Horizontal bars of samples/s per method (skipped methods left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "samples_per_s" in r]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(done) + 1.2))
    colors = ["#c44e52" if r["method"] == "cmp" else "#4c72b0" for r in done]
    ax.barh([r["label"] for r in done], [r["samples_per_s"] for r in done], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("samples/s (median of repeats)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def fault_table(paths: list[str | Path]) -> str:
    """One row per measured fault from the JSON lists the reliability tests write (``HEARTBEAT_JSON``,
    ``RESTART_JSON``): the case, the heartbeat timeout, and the time from the fault until every process was gone
    or until the restarted job's first step.

    Examples:
        >>> import json, tempfile
        >>> f = Path(tempfile.mkdtemp()) / "x.json"
        >>> _ = f.write_text(json.dumps([{"case": "K=2", "heartbeat_timeout_s": 10, "all_gone_s": 10.6}]))
        >>> print(fault_table([f]).splitlines()[2])
        | K=2 | 10 |  | 10.6 |  |
    """
    lines = [
        "| fault | heartbeat_timeout (s) | lost worker reported after (s) | all processes gone after (s) "
        "| first step after the restart (s) |",
        "|---|---|---|---|---|",
    ]
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            detected, gone, restarted = (
                "" if row.get(k) is None else row[k] for k in ("detected_s", "all_gone_s", "first_step_after_restart_s")
            )
            lines.append(f"| {row['case']} | {row['heartbeat_timeout_s']} | {detected} | {gone} | {restarted} |")
    return "\n".join(lines)
