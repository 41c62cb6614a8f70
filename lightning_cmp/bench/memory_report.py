"""The memory benchmark's outputs: the per-worker Markdown table and the check of the per-worker memory target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_table", "target_check", "target_lines", "whole_state"]

COLUMNS = (
    "run", "workers", "rank", "set-up", "after the last step: params + grads + optimizer", "checkpoint (+ gathered)",
    "after fit", "max / whole", "peak activations", "peak RSS (when)", "peak private + shared",
)  # fmt: skip


def held_at(point: dict[str, Any]) -> int:
    """Parameters + gradients + optimizer state at ``point``, plus checkpoint tensors that are not the worker's own.

    Examples:
        >>> held_at({"state": 30, "checkpoint_extra": 12})
        42
    """
    return int(point["state"]) + int(point.get("checkpoint_extra", 0))


def whole_state(rows: Sequence[dict[str, Any]], parameter_bytes: int) -> int:
    """The whole model's state: the most parameters + gradients + optimizer state single device held, or
    parameters x 3 (SGD momentum) without a single-device run.

    Examples:
        >>> whole_state([], 100)
        300
        >>> whole_state([{"run": "single", "ranks": [{"points": [{"state": 100}, {"state": 290}]}]}], 100)
        290
    """
    single = next((r for r in rows if r["run"] == "single" and not r.get("error") and r["ranks"][0]), None)
    if single is None:
        return 3 * parameter_bytes  # parameters, their gradients and one momentum buffer each
    return max(int(p["state"]) for p in single["ranks"][0]["points"])


def target_check(row: dict[str, Any], whole: int, excepted: Sequence[tuple[int, str]]) -> dict[str, Any]:
    """Whether every worker of ``row`` held at most 1.1 x 2/K of ``whole`` at every point, but the ``excepted``.

    ``excepted`` lists (rank, point) pairs where a rank assembles what the user asked to have whole.

    Examples:
        >>> points = [{"point": "step 1", "state": 50}, {"point": "checkpoint", "state": 50, "checkpoint_extra": 50}]
        >>> row = {"run": "cmp-4", "workers": 4, "ranks": [{"points": points}] * 4}
        >>> check = target_check(row, 100, [(0, "checkpoint")])
        >>> check["pass"], check["worst_ratio"], [(o["rank"], o["excepted"]) for o in check["over_limit"]]
        (False, 1.0, [(0, True), (1, False), (2, False), (3, False)])
    """
    workers = row["workers"]
    limit = 1.1 * 2 / workers * whole
    result: dict[str, Any] = {
        "run": row["run"], "workers": workers, "whole_bytes": whole, "limit_bytes": int(limit),
        "excepted": [list(e) for e in excepted],
    }  # fmt: skip
    if row.get("error") or any(r is None for r in row["ranks"]):
        return {**result, "pass": False, "error": row.get("error", "a worker did not report")}
    over, worst = [], (-1, 0, "")
    for rank, record in enumerate(row["ranks"]):
        for point in record["points"]:
            held, excused = held_at(point), (rank, point["point"]) in excepted
            if not excused:
                worst = max(worst, (held, rank, point["point"]))
            if held > limit:
                over.append({"rank": rank, "point": point["point"], "bytes": held, "excepted": excused})
    return {
        **result,
        "pass": all(o["excepted"] for o in over),
        "worst_ratio": round(worst[0] / whole, 3),
        "worst": {"rank": worst[1], "point": worst[2], "bytes": worst[0]},
        "over_limit": over,
    }


def target_lines(targets: Sequence[dict[str, Any]]) -> list[str]:
    """One line per checked run: pass/fail, the worst worker and point, and the points over the limit.

    Examples:
        >>> target_lines([{"run": "cmp-4", "workers": 4, "pass": True, "worst_ratio": 0.5, "limit_bytes": 55,
        ...     "whole_bytes": 100, "worst": {"rank": 1, "point": "step 2"}, "over_limit": []}])[1]
        '- cmp-4: PASS: at most 0.500 x whole per worker (rank 1, step 2); limit 0.550 x'
    """
    lines = ["Target: cmp at K=4 holds <= 1.1 x 2/K of the whole model's params + grads + optimizer per worker"]
    for t in targets:
        if "error" in t:
            lines.append(f"- {t['run']}: FAIL: {t['error']}")
            continue
        verdict = "PASS" if t["pass"] else "FAIL"
        limit = t["limit_bytes"] / t["whole_bytes"]
        line = f"- {t['run']}: {verdict}: at most {t['worst_ratio']:.3f} x whole per worker "
        line += f"({_where(t['worst'])}); limit {limit:.3f} x"
        over = [o for o in t["over_limit"] if not o["excepted"]]
        if over:
            line += "; over it: " + ", ".join(f"{_where(o)} {o['bytes'] / t['whole_bytes']:.2f} x" for o in over)
        excused = [o for o in t["over_limit"] if o["excepted"]]
        if excused:
            line += "; excepted: " + ", ".join(f"{_where(o)} {o['bytes'] / t['whole_bytes']:.2f} x" for o in excused)
        lines.append(line)
    return lines


#: what a worker does between the previous point and this one (the checkpoint is saved at the last step)
PHASES = {"set-up": "set-up", "checkpoint": "checkpoint gather", "end of training": "checkpoint write",
          "after fit": "teardown"}  # fmt: skip


def peak_phase(points: Sequence[dict[str, Any]]) -> str:
    """The phase that ended at the point with the highest sampled RSS since the previous point.

    Examples:
        >>> peak_phase([{"point": "step 1", "peak_rss_since_previous_mib": 9},
        ...             {"point": "end of training", "peak_rss_since_previous_mib": 12}])
        'checkpoint write'
    """
    top = max(points, key=lambda p: p.get("peak_rss_since_previous_mib") or 0.0, default=None)
    return "n/a" if top is None else PHASES.get(top["point"], top["point"])


def _where(entry: dict[str, Any]) -> str:
    return f"rank {entry['rank']}, {entry['point']}"


def _mib(nbytes: float) -> str:
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.2f}"


def _at(points: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((p for p in reversed(points) if p["point"] == name), None)


def _rank_cells(record: dict[str, Any], whole: int) -> list[str]:
    points = record["points"]
    setup, checkpoint, after = _at(points, "set-up"), _at(points, "checkpoint"), _at(points, "after fit")
    step = next((p for p in reversed(points) if p["point"].startswith("step")), None)
    return [
        _mib(setup["state"]) if setup else "n/a",
        " + ".join(_mib(step[k]) for k in ("parameters", "gradients", "optimizer")) if step else "n/a",
        (_mib(checkpoint["state"]) + (f" + {_mib(checkpoint['checkpoint_extra'])}")) if checkpoint else "n/a",
        _mib(after["state"]) if after else "n/a",
        f"{max(held_at(p) for p in points) / whole:.2f}" if points else "n/a",
        _mib(record["peak_activation_bytes"]),
        f"{record['peak_rss_mib']:.0f} ({peak_phase(points)})",
        _private_shared(points),
    ]


def _private_shared(points: Sequence[dict[str, Any]]) -> str:
    """Peak private data (``VmData``, what ``RLIMIT_DATA`` caps) + the most shared memory mapped (``RssShmem``)."""
    private = max((p.get("peak_vm_data_since_previous_mib") or 0.0 for p in points), default=0.0)
    shared = max((p.get("rss_shmem_mib") or 0.0 for p in points), default=0.0)
    return f"{private:.0f} + {shared:.0f}" if private else "n/a"


def markdown_table(rows: Sequence[dict[str, Any]], whole: int) -> str:
    """One line per worker, in MiB; ``max / whole`` is the worker's largest holding over the whole model's state.

    ``peak private + shared``: the most private data the worker mapped (what ``RLIMIT_DATA`` caps), sampled, and
    the most shared memory it mapped (``cmp``'s exchange regions in ``/dev/shm``: its own and its mirror's).

    Examples:
        >>> point = {"point": "step 1", "state": 3 * 2**20, "parameters": 2**20, "gradients": 2**20,
        ...          "optimizer": 2**20}
        >>> record = {"points": [point], "peak_activation_bytes": 2**19, "peak_rss_mib": 700.0}
        >>> print(markdown_table([{"label": "single device", "workers": 1, "ranks": [record]}], 3 * 2**20)
        ...       .splitlines()[2])
        | single device | 1 | 0 | n/a | 1.00 + 1.00 + 1.00 | n/a | n/a | 1.00 | 0.50 | 700 (step 1) | n/a |
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        for rank, record in enumerate(row["ranks"]):
            cells = _rank_cells(record, whole) if record and "error" not in record else None
            if cells is None:
                failed = (record or {}).get("error") or row.get("error") or "no record"
                cells = [f"failed: {_short(failed)}", *[""] * (len(COLUMNS) - 4)]
            lines.append(f"| {row['label']} | {row['workers']} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(message: str, width: int = 120) -> str:
    text = " ".join(message.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."
