"""MkDocs hook: replaces ``<!-- timetable ... -->`` markers with timetables rendered by the schedule layer."""

from __future__ import annotations

import re
from typing import Any

from lightning_cmp.schedule import SCHEDULES, lower, render, simulate

# <!-- timetable schedule=cmp num_stages=4 -->  and  <!-- makespans num_stages=2,3,4 -->
_TIMETABLE = re.compile(r"<!--\s*timetable\s+schedule=(\w+)\s+num_stages=(\d+)(?:\s+num_microbatches=(\d+))?\s*-->")
_MAKESPANS = re.compile(r"<!--\s*makespans\s+num_stages=([\d,]+)\s*-->")


def timetable_block(schedule: str, num_stages: int, num_microbatches: int | None = None) -> str:
    """A fenced block with the rendered timetable of one schedule (built, not hand-drawn)."""
    spec = SCHEDULES[schedule]
    m = num_microbatches or spec.default_microbatches
    table = render(spec.build(num_stages, m, spec.placement(num_stages)))
    return f'```text title="{schedule}, num_stages={num_stages}, num_microbatches={m}"\n{table}\n```'


def makespan_table(stage_counts: list[int]) -> str:
    """Simulated step time per schedule (forward = 1, backward = 2, free communication) as a Markdown table."""
    header = "| schedule | " + " | ".join(f"K={k}" for k in stage_counts) + " |"
    rows = [header, "|---|" + "---:|" * len(stage_counts)]
    for name, spec in SCHEDULES.items():
        cells = []
        m = spec.default_microbatches
        for k in stage_counts:
            placement = spec.placement(k)
            program = lower(spec.build(k, m, placement), placement, m, average_gradients=spec.num_replicas > 1)
            cells.append(f"{simulate(program, placement, m).makespan:.1f}")
        label = f"`{name}`" + (f" (num_microbatches={m})" if m > 1 else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Expand the markers of every page before MkDocs converts it to HTML."""
    markdown = _TIMETABLE.sub(lambda m: timetable_block(m[1], int(m[2]), int(m[3]) if m[3] else None), markdown)
    return _MAKESPANS.sub(lambda m: makespan_table([int(k) for k in m[1].split(",")]), markdown)
