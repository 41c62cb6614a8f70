"""``python -m lightning_cmp.bench --quick`` runs end to end and writes every output (no timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_cmp.bench.__main__ import QUICK_METHODS
from lightning_cmp.bench.report import COLUMNS
from tests.helpers.python import run_python


def test_quick_benchmark_outputs(tmp_path: Path) -> None:
    proc = run_python("-m", "lightning_cmp.bench", "--quick", "--out", str(tmp_path))
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table) >= 1 + len(QUICK_METHODS)
    assert any(line.startswith("| schedule | K=2 |") for line in table)  # the projection table

    record = json.loads((tmp_path / "bench.json").read_text())
    keys = {"command", "config", "machine", "memory", "cuts", "rows", "projection_s_per_step", "timelines"}
    assert keys <= set(record)
    assert [r["method"] for r in record["rows"]] == QUICK_METHODS
    for row in record["rows"]:
        if "error" in row:
            continue
        assert row["samples_per_s"] > 0
        assert len(row["peak_rss_mib"]) == row["workers"]
    ours = {r["method"]: r for r in record["rows"]}
    assert len(ours["cmp"]["idle_fraction"]) == 2
    assert "error" not in ours["cmp2"], ours["cmp2"]  # micro-batched cmp: the loss per microbatch
    assert set(record["projection_s_per_step"]) == {"mp", "gpipe4", "cmp"}
    assert set(record["timelines"]) == {"mp", "cmp"}
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert (tmp_path / "timeline.png").stat().st_size > 0
