"""The scale-out benchmark: its network model and projection (in process), one quick run of its raw rows (bytes
counted from the collectives really started, optimizer-state shares) and the docs' tables from the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_cmp.bench.models import build
from lightning_cmp.bench.scaleout import (
    fit_alpha_beta,
    project_data_parallel,
    ring_bytes,
    ring_seconds,
    tables_from_json,
)
from tests.helpers.python import run_python

ROOT = Path(__file__).resolve().parents[2]
FORWARD, BACKWARD = [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]
PARAMS = [100, 100, 100, 100]


def test_ring_collectives_send_what_an_all_reduce_is_made_of() -> None:
    # an all-reduce is a reduce-scatter followed by an all-gather: the same bytes and steps
    for n in (2, 3, 8):
        assert ring_bytes("all_reduce", 800, n) == ring_bytes("reduce_scatter", 800, n) + ring_bytes(
            "all_gather", 800, n
        )
        whole = ring_seconds("all_reduce", 800, n, 1e-5, 1e-9)
        assert whole == pytest.approx(2 * ring_seconds("reduce_scatter", 800, n, 1e-5, 1e-9))
    assert fit_alpha_beta([1000, 10_000, 20_000], [2e-5, 0.5e-4, 1e-4]) == (pytest.approx(1.5e-5), pytest.approx(5e-9))


def test_projection_free_network_is_perfect_scaling_and_a_slow_one_favours_overlap() -> None:
    free = project_data_parallel(FORWARD, BACKWARD, PARAMS, 0.0, 64, alpha=0.0, beta=0.0, bucket_bytes=100)
    assert free["serial"] == free["allreduce"] == free["sharded"] == free["compute"] == 12.0
    # bandwidth-bound: every bucket's transfer is shorter than a block's backward, so the overlapped forms hide all
    # but the last bucket's, and the sharded form's gathers hide behind the forward of the layers before them
    slow = project_data_parallel(FORWARD, BACKWARD, PARAMS, 0.0, 2, alpha=0.0, beta=0.01, bucket_bytes=100)
    assert slow["serial"] == pytest.approx(12.0 + 4.0)  # 400 bytes all-reduced over 2 ranks: 2 x 200 x 0.01
    assert slow["allreduce"] == pytest.approx(12.0 + 1.0)  # the first block's bucket, after backward ends
    assert slow["sharded"] == pytest.approx(12.0 + 0.5 + 0.5)  # its reduce-scatter, then the first gather
    # the optimizer step is divided by the workers in the sharded form only
    stepped = project_data_parallel(FORWARD, BACKWARD, PARAMS, 0.01, 4, alpha=0.0, beta=0.0, bucket_bytes=100)
    assert stepped["allreduce"] - 12.0 == pytest.approx(4.0)
    assert stepped["sharded"] - 12.0 == pytest.approx(1.0)
    # latency grows with a ring's length: efficiency falls with the workers
    efficiency = [
        (t := project_data_parallel(FORWARD, BACKWARD, PARAMS, 0.0, p, alpha=1e-3, beta=0.0))["compute"]
        / t["allreduce"]
        for p in (2, 64, 1024)
    ]
    assert efficiency[0] > efficiency[1] > efficiency[2]


def test_quick_run_counts_the_averaging_bytes_and_shards_the_optimizer_state(tmp_path: Path) -> None:
    run_python(
        "-m", "lightning_cmp.bench.scaleout", "--quick", "--raw", "dp_allreduce", "dp_sharded",
        "--workers", "1", "2", "8", "--out", str(tmp_path),
    )  # fmt: skip
    record = json.loads((tmp_path / "scaleout.json").read_text())
    rows = {r["method"]: r for r in record["raw"]}
    weights = sum(p.numel() * p.element_size() for p in build("tiny").parameters()) / 2**20
    # 2 workers: an all-reduce sends 2(n-1)/n = 1 x the gradients; reduce-scatter + all-gather the same, plus the
    # padding of each bucket to a multiple of n and the per-parameter "got a gradient" flags
    assert rows["dp_allreduce"]["sent_mib_per_step"] == [pytest.approx(weights, abs=0.01)] * 2
    assert all(weights <= s <= weights * 1.02 + 0.01 for s in rows["dp_sharded"]["sent_mib_per_step"])
    assert rows["dp_allreduce"]["optimizer_state_share"] == [1.0, 1.0]
    assert all(0.5 <= s <= 0.52 for s in rows["dp_sharded"]["optimizer_state_share"])
    for row in rows.values():
        assert row["samples_per_s"] > 0
        assert all(o is not None and 0.0 <= o <= 1.0 for o in row["overlap"])
        assert all(a > 0 for a in row["alone_s"])
    assert [r["workers"] for r in record["projection"]["rows"]] == [1, 2, 8]
    assert "| 8 |" in tables_from_json(tmp_path / "scaleout.json")
    assert (tmp_path / "scaleout_projection.png").stat().st_size > 0


def test_the_committed_json_renders_the_docs_tables() -> None:
    path = ROOT / "docs" / "bench" / "scaleout.json"
    record = json.loads(path.read_text())
    text = tables_from_json(path)
    assert text.count("| method |") == 1 and "| through the Trainer |" in text
    for row in record["raw"]:
        assert f"| {row['label']} |" in text
    assert {r["method"] for r in record["trainer"]} >= {"ddp2", "sharded_dp2", "ddp4", "cmp2x2"}
