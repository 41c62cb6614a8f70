"""Chrome/Perfetto execution traces and idle fractions from the executor's per-rank action timings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CATEGORIES", "Timing", "category", "chrome_trace", "compute_fraction", "write_trace"]

#: One executed action: ``(str(action), start, end)`` in ``time.perf_counter()`` seconds (``Executor.timings``).
Timing = tuple[str, float, float]

#: The categories a trace event gets, in the order plots stack them.
CATEGORIES = ("forward", "backward", "communication", "wait")


def category(action: str) -> str:
    """What an executed action spent its time on: computing, sending, or blocked on a peer.

    Receives, OUTPUT broadcasts and WAIT_AVERAGE block until a peer is ready, so they are ``wait``;
    sends and the start of an averaging only post messages, so they are ``communication``.

    Examples:
        >>> category("F.A0.m0"), category("SEND_ACT.A0.m0->1"), category("RECV_GRAD.A0.m0<-1")
        ('forward', 'communication', 'wait')
    """
    kind = action.split(".", 1)[0]
    if kind == "F":
        return "forward"
    if kind == "B":
        return "backward"
    if kind.startswith("SEND") or kind == "AVERAGE":
        return "communication"
    return "wait"


def chrome_trace(timings: Sequence[Sequence[Timing]]) -> dict[str, Any]:
    """A Chrome trace (``chrome://tracing``, https://ui.perfetto.dev) of every rank's actions.

    ``timings[rank]`` is that rank's list; each rank is one process (``pid``) and thread (``tid``) named
    ``rank N``; times are microseconds from the earliest action of any rank. Clocks of processes on one
    machine agree; across machines they are only as close as the hosts' clocks.

    Examples:
        >>> trace = chrome_trace([[("F.A0.m0", 1.0, 1.5)], [("F.A1.m0", 1.5, 2.0)]])
        >>> [(e["name"], e["pid"], e["ts"], e["dur"]) for e in trace["traceEvents"] if e["ph"] == "X"]
        [('F.A0.m0', 0, 0.0, 500000.0), ('F.A1.m0', 1, 500000.0, 500000.0)]
    """
    starts = [start for rank in timings for _, start, _ in rank]
    origin = min(starts, default=0.0)
    events: list[dict[str, Any]] = []
    for rank, actions in enumerate(timings):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": rank, "args": {"name": f"rank {rank}"}})
        for name, start, end in actions:
            ts = round((start - origin) * 1e6, 3)
            dur = round((end - start) * 1e6, 3)
            events.append(
                {"name": name, "cat": category(name), "ph": "X", "pid": rank, "tid": rank, "ts": ts, "dur": dur}
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str | Path, timings: Sequence[Sequence[Timing]]) -> Path:
    """Write `chrome_trace` of ``timings`` to ``path`` (parent folders created); returns the path.

    Examples:
        >>> write_trace(tmp_path / "run.json", [[("F.A0.m0", 0.0, 0.1)]])  # doctest: +SKIP
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(chrome_trace(timings)))
    return target


def compute_fraction(actions: Sequence[Timing], start: float | None = None, end: float | None = None) -> float:
    """Share of ``[start, end]`` (default: first to last action) this rank spent in forward or backward.

    One minus it is the rank's idle (bubble) fraction, communication and waiting included.

    Examples:
        >>> compute_fraction([("F.A0.m0", 0.0, 1.0), ("RECV_GRAD.A0.m0<-1", 1.0, 3.0), ("B.A0.m0", 3.0, 4.0)])
        0.5
    """
    if not actions:
        return 0.0
    lo = min(s for _, s, _ in actions) if start is None else start
    hi = max(e for _, _, e in actions) if end is None else end
    busy = sum(e - s for name, s, e in actions if category(name) in ("forward", "backward"))
    return busy / (hi - lo) if hi > lo else 0.0
