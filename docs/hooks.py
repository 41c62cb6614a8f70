"""MkDocs hook: expands ``<!-- timetable ... -->`` / ``<!-- makespans ... -->`` markers with tables built by the
schedule layer, and ``<!-- output -->`` markers with what the page's code printed when run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_cmp.bench.accuracy import accuracy_table
from lightning_cmp.bench.asynchronous import tables_from_json as asynchronous_tables
from lightning_cmp.bench.bipartition import tables_from_json as bipartition_tables
from lightning_cmp.bench.latency import table as latency_table
from lightning_cmp.bench.microbatches import tables_from_json
from lightning_cmp.bench.report import fault_table
from lightning_cmp.bench.scaleout import tables_from_json as scaleout_tables
from lightning_cmp.bench.summary import overview as bench_overview
from lightning_cmp.bench.summary import tables_from_json as bench_tables
from lightning_cmp.bench.time_to_accuracy import time_to_accuracy_table
from lightning_cmp.schedule import SCHEDULES, lower, render, render_async, simulate

# <!-- timetable schedule=cmp num_stages=4 -->  and  <!-- makespans num_stages=2,3,4 -->
_MICROBATCHES = re.compile(r"<!--\s*microbatches\s+json=(\S+)\s*-->")
_BIPARTITION = re.compile(r"<!--\s*bipartition\s+json=(\S+)\s*-->")
_SCALEOUT = re.compile(r"<!--\s*scaleout\s+json=(\S+)\s*-->")
# <!-- bench json=docs/bench/vgg.json -->: the main benchmark's tables of one run
_BENCH = re.compile(r"<!--\s*bench\s+json=(\S+)\s*-->")
# <!-- bench-overview json=docs/bench/vgg.json,docs/bench/resnet50.json -->: one column per run
_BENCH_OVERVIEW = re.compile(r"<!--\s*bench-overview\s+json=(\S+)\s*-->")
# <!-- time-to-accuracy json=docs/bench/time_to_accuracy.json -->: time to accuracy, then test accuracy and speed
_TIME_TO_ACCURACY = re.compile(r"<!--\s*time-to-accuracy\s+json=(\S+)\s*-->")
# <!-- faults json=docs/bench/heartbeats.json,docs/bench/restarts.json -->
_FAULTS = re.compile(r"<!--\s*faults\s+json=(\S+)\s*-->")
# <!-- latency json=docs/bench/latency.json -->: one message each way between two workers, by how it is sent
_LATENCY = re.compile(r"<!--\s*latency\s+json=(\S+)\s*-->")
_TIMETABLE = re.compile(r"<!--\s*timetable\s+schedule=(\w+)\s+num_stages=(\d+)(?:\s+num_microbatches=(\d+))?\s*-->")
_MAKESPANS = re.compile(r"<!--\s*makespans\s+num_stages=([\d,]+)\s*-->")
# <!-- asynchronous json=docs/bench/async.json accuracy=docs/bench/accuracy_async.json -->
_ASYNCHRONOUS = re.compile(r"<!--\s*asynchronous\s+json=(\S+)\s+accuracy=(\S+)\s*-->")
# <!-- versions num_stages=3 num_batches=4 policy=predict -->
_VERSIONS = re.compile(r"<!--\s*versions\s+num_stages=(\d+)\s+num_batches=(\d+)\s+policy=(\w+)\s*-->")
# <!-- output --> after a ```python block: what the page's blocks printed since the previous marker
_OUTPUT = re.compile(r"<!--\s*output\s*-->")
_PYTHON = re.compile(r"^```python[^\n]*\n(.*?)\n```", re.DOTALL | re.MULTILINE)


def _accuracy_tables(path: str) -> str:
    record = json.loads(Path(path).read_text())
    return time_to_accuracy_table(record) + "\n\n" + accuracy_table(record)


def timetable_block(schedule: str, num_stages: int, num_microbatches: int | None = None) -> str:
    """A fenced block with the rendered timetable of one schedule (built, not hand-drawn)."""
    spec = SCHEDULES[schedule]
    m = num_microbatches or spec.default_microbatches
    table = render(spec.build(num_stages, m, spec.placement(num_stages)))
    return f'```text title="{schedule}, num_stages={num_stages}, num_microbatches={m}"\n{table}\n```'


def versions_block(num_stages: int, num_batches: int, policy: str) -> str:
    """A fenced block with the asynchronous timetable and the weight version of every pass (built, not drawn)."""
    table = render_async(num_stages, num_batches, policy)
    title = f"policy={policy}, num_stages={num_stages}, {num_batches} mini-batches, then the drain"
    return f'```text title="{title}"\n{table}\n```'


def makespan_table(stage_counts: list[int]) -> str:
    """Simulated step time per schedule (forward = 1, backward = 2, free communication) as a Markdown table."""
    header = "| schedule | " + " | ".join(f"K={k}" for k in stage_counts) + " |"
    rows = [header, "|---|" + "---:|" * len(stage_counts)]
    runs = [(name, spec, spec.default_microbatches) for name, spec in SCHEDULES.items() if not spec.asynchronous]
    runs += [(name, spec, 4) for name, spec in SCHEDULES.items() if spec.interleaves]
    for name, spec, m in runs:
        cells = []
        for k in stage_counts:
            placement = spec.placement(k)
            table = spec.build(k, m, placement)
            program = lower(table, placement, m, spec.num_replicas > 1, spec.loss_per_microbatch(m))
            cells.append(f"{simulate(program, placement, m).makespan:.2f}")
        label = f"`{name}`" + (f" (num_microbatches={m})" if m > 1 else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning logs its set-up ("GPU available: ...") to the console; the build output does not need it."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def with_outputs(markdown: str, name: str = "page") -> str:
    """Run the page's ```python blocks in order in one namespace and put at every ``<!-- output -->`` marker a
    ```text block with what they printed since the previous marker. Nothing printed is an error: the example
    no longer shows what the page says it shows."""
    if not _OUTPUT.search(markdown):
        return markdown
    events = [(m.start(), m.end(), m[1]) for m in _PYTHON.finditer(markdown)]
    events += [(m.start(), m.end(), None) for m in _OUTPUT.finditer(markdown)]
    namespace: dict[str, Any] = {"__name__": "docs"}
    printed, pieces, done = io.StringIO(), [], 0
    for start, end, code in sorted(events):
        if code is not None:
            with contextlib.redirect_stdout(printed), _quiet_lightning():
                exec(compile(textwrap.dedent(code), name, "exec"), namespace)
            continue
        text = printed.getvalue().rstrip()
        if not text:
            raise RuntimeError(f"{name}: the code before <!-- output --> at offset {start} printed nothing")
        pieces += [markdown[done:start], f'```text title="Output"\n{text}\n```']
        printed, done = io.StringIO(), end
    return "".join([*pieces, markdown[done:]])


def on_page_markdown(markdown: str, page: Any = None, **kwargs: Any) -> str:
    """Expand the markers of every page before MkDocs converts it to HTML."""
    name = page.file.src_path if page is not None else "page"
    markdown = _TIMETABLE.sub(lambda m: timetable_block(m[1], int(m[2]), int(m[3]) if m[3] else None), markdown)
    markdown = _MAKESPANS.sub(lambda m: makespan_table([int(k) for k in m[1].split(",")]), markdown)
    markdown = _MICROBATCHES.sub(lambda m: tables_from_json(m[1]), markdown)
    markdown = _BIPARTITION.sub(lambda m: bipartition_tables(m[1]), markdown)
    markdown = _SCALEOUT.sub(lambda m: scaleout_tables(m[1]), markdown)
    markdown = _BENCH.sub(lambda m: bench_tables(m[1]), markdown)
    markdown = _BENCH_OVERVIEW.sub(lambda m: bench_overview(m[1].split(",")), markdown)
    markdown = _TIME_TO_ACCURACY.sub(lambda m: _accuracy_tables(m[1]), markdown)
    markdown = _FAULTS.sub(lambda m: fault_table(m[1].split(",")), markdown)
    markdown = _LATENCY.sub(lambda m: latency_table(json.loads(Path(m[1]).read_text())), markdown)
    markdown = _ASYNCHRONOUS.sub(lambda m: asynchronous_tables(m[1], m[2]), markdown)
    markdown = _VERSIONS.sub(lambda m: versions_block(int(m[1]), int(m[2]), m[3]), markdown)
    return with_outputs(markdown, name)
