"""``python -m lightning_cmp.bench --quick`` runs end to end and writes every output (no timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_cmp.bench.__main__ import QUICK_METHODS
from lightning_cmp.bench.methods import BREAKDOWN
from lightning_cmp.bench.summary import tables_from_json
from tests.helpers.python import run_python


def test_quick_benchmark_outputs(tmp_path: Path) -> None:
    proc = run_python("-m", "lightning_cmp.bench", "--quick", "--trainer", "cmp", "ddp", "--out", str(tmp_path))
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| method | workers | samples/s") for line in table)
    assert any(line.startswith("| schedule | K=2 |") for line in table)  # the projection table
    assert any(line.startswith("| through `L.Trainer`") for line in table)

    path = tmp_path / "bench.json"
    record = json.loads(path.read_text())
    keys = {"command", "config", "machine", "memory", "timed_region", "cuts", "compute_profile", "rows", "best_of"}
    assert keys | {"trainer", "projection_s_per_step", "projection_error", "timelines"} <= set(record)
    assert [r["method"] for r in record["rows"]] == QUICK_METHODS
    for row in record["rows"]:
        if "error" in row:
            continue
        assert row["samples_per_s"] > 0
        assert len(row["peak_rss_mib"]) == row["workers"]
    ours = {r["method"]: r for r in record["rows"]}
    assert len(ours["cmp"]["idle_fraction"]) == 2
    assert "error" not in ours["cmp2"], ours["cmp2"]  # micro-batched cmp: the loss per microbatch
    # the ideal step from measured compute, and the measured step's share of it
    profile = record["compute_profile"]
    assert profile["whole_s"]["16"] > 0 and profile["whole_s"]["8"] > 0 and profile["corun_half_s"] > 0
    assert ours["cmp"]["ideal_s"] == profile["whole_s"]["8"] + profile["optimizer_s"]
    assert 0 < ours["cmp"]["of_ideal"] == ours["cmp"]["ideal_s"] / ours["cmp"]["step_s"]
    assert ours["gpipe2"]["ideal_s"] is None  # a pipeline with a bubble has no ideal here
    # where cmp's step goes, per worker: the parts cover the step
    for parts in ours["cmp"]["breakdown_s"]:
        assert set(parts) == set(BREAKDOWN) and parts["compute"] > 0 and parts["optimizer step"] > 0
        assert sum(parts.values()) >= 0.5 * min(ours["cmp"]["step_s_repeats"])
    assert record["best_of"]["torch DDP"]["method"] == "ddp"
    assert [r["method"] for r in record["trainer"]] == ["cmp", "ddp"]
    assert all(r["samples_per_s"] > 0 and r["of_ideal"] > 0 for r in record["trainer"])
    assert set(record["projection_s_per_step"]) == {"mp", "gpipe4", "cmp"}
    assert set(record["projection_error"]) == {"mp", "cmp"}
    assert set(record["timelines"]) == {"mp", "cmp"}
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert tables_from_json(path) in proc.stdout  # the docs render the same tables from the file
