"""Per-worker timeline (Gantt chart) of one training step: forward, backward, communication, wait, idle."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_cmp.runtime.trace import Timing, category

__all__ = ["plot_timelines"]

COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "communication": "#55a868", "wait": "#c44e52"}


def plot_timelines(runs: dict[str, Sequence[Sequence[Timing]]], path: Path) -> Path:
    """One panel per method, one row per rank; ``runs[name][rank]`` starts with a ``("STEP", start, end)``.

    Gaps inside the step (white) are time outside the executor: loss, optimizer step, Python.

    Examples:
        >>> plot_timelines({"mp": mp_timings, "cmp": cmp_timings}, out / "timeline.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.8 * sum(len(r) for r in runs.values())), squeeze=False)
    for ax, (name, ranks) in zip(axes[:, 0], runs.items(), strict=True):
        origin = min(t[1] for rank in ranks for t in rank if t)
        for row, actions in enumerate(ranks):
            for label, start, end in actions:
                x0, width = (start - origin) * 1e3, (end - start) * 1e3
                if label == "STEP":
                    ax.broken_barh([(x0, width)], (row - 0.4, 0.8), facecolors="none", edgecolors="black")
                    continue
                ax.broken_barh([(x0, width)], (row - 0.35, 0.7), facecolors=COLORS[category(label)])
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
        ax.invert_yaxis()
        ax.set_title(f"{name}: one training step")
        ax.set_xlabel("ms")
    handles = [Patch(color=c, label=k) for k, c in COLORS.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", label="idle (step frame)"))
    fig.legend(handles=handles, loc="upper right", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
