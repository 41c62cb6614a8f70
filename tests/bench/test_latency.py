"""``python -m lightning_cmp.bench.latency``: two workers exchange tensors four ways; the record and its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_cmp.bench import latency

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_the_latency_bench_times_every_mode_and_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latency.json"
    latency.main(["--sizes", "64", "4096", "--rounds", "1", "--per-round", "3", "--timeout", "120", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = {(r["mode"], r["bytes"]): r for r in record["rows"]}
    assert set(rows) == {(mode, size) for mode in latency.MODES for size in (64, 4096)}
    for row in rows.values():  # 3 exchanges on each of the 2 workers; a wait is positive and short on one machine
        assert row["samples"] == 6 and 0 < row["median_ms"] <= row["p90_ms"] < 5_000
    assert record["machine"]["cpus"] and record["command"].startswith("python -m lightning_cmp.bench.latency")
    printed = capsys.readouterr().out
    assert "| `pre_posted`: payload only" in printed and "4096 B: p90" in printed


def test_bad_arguments_are_refused_before_any_worker_starts() -> None:
    with pytest.raises(SystemExit):
        latency.main(["--sizes", "2"])


def test_the_docs_table_is_rendered_from_the_saved_record() -> None:
    record = json.loads((ROOT / "docs/bench/latency.json").read_text())
    table = latency.table(record)
    assert table.count("\n") == 1 + len(latency.MODES)  # header, rule, one row per mode
    header = next(r for r in record["rows"] if r["mode"] == "header" and r["bytes"] == 1 << 20)
    assert f"{header['median_ms']:.2f} | {header['p90_ms']:.2f}" in table
