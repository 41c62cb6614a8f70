"""Measurements: peak memory of a worker process and the per-method summary of its repeats."""

from __future__ import annotations

import resource
import statistics
import sys
from typing import Any

__all__ = ["peak_rss_mib", "summarize"]


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (``ru_maxrss``) in MiB.

    Each method runs in fresh processes, so the mark is that method's peak (Python and torch included).

    Examples:
        >>> peak_rss_mib() > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes, Linux KiB


def summarize(per_rank: list[dict[str, Any]], steps: int, batch_size: int) -> dict[str, Any]:
    """Samples/s and seconds per step (medians over repeats, rank 0's clock), peak RSS, idle fraction and (our
    schedules) the step's breakdown per worker.

    Examples:
        >>> row = summarize([{"seconds": [1.0, 2.0, 1.0], "compute": [], "rss_mib": 300.0}], 4, 8)
        >>> row["samples_per_s"], row["peak_rss_mib"], row["idle_fraction"]
        (32.0, [300.0], None)
    """
    seconds = per_rank[0]["seconds"]
    rate = [steps * batch_size / s for s in seconds]
    idle = [1.0 - statistics.median(r["compute"]) for r in per_rank] if per_rank[0]["compute"] else None
    return {
        "samples_per_s": statistics.median(rate),
        "samples_per_s_repeats": rate,
        "step_s": statistics.median(seconds) / steps,
        "step_s_repeats": [s / steps for s in seconds],
        "peak_rss_mib": [round(r["rss_mib"], 1) for r in per_rank],
        "idle_fraction": idle,
        "breakdown_s": [r["breakdown_s"] for r in per_rank] if per_rank[0].get("breakdown_s") else None,
    }
