"""The micro-batched cmp projection (in process, synthetic costs) and the docs' tables from its committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_cmp.bench.microbatches import CMP_N, OTHER_M, TORCH, project, tables_from_json

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = 16


def _linear_costs(batch: int) -> dict[int, list[tuple[float, float]]]:
    """Per-block (forward, backward) seconds proportional to the rows: microbatches cost no efficiency."""
    sizes = {batch // d for d in (1, 2, 4, 8, 16)}
    return {n: [(n / batch / BLOCKS, 2 * n / batch / BLOCKS)] * BLOCKS for n in sizes}


def test_projection_with_linear_costs() -> None:
    batch = 64
    result = project(_linear_costs(batch), batch, exchange_per_byte=0.0, params=[0] * BLOCKS, ks=range(2, 9))
    assert list(result) == [2, 3, 4, 5, 6, 7, 8]
    for k, row in result.items():
        assert set(row) == {"cmp", "gpipe", *TORCH, "cmp_vs_best_other", "cmp_without_idle"}
        assert row["cmp_without_idle"]["step_s"] <= row["cmp"]["step_s"]
        assert row["cmp"]["best_microbatches"] in CMP_N
        assert row["gpipe"]["best_microbatches"] in OTHER_M
        # the whole model's forward and backward cost 3 seconds: nothing beats 3/K per step on K ranks
        assert min(v["step_s"] for n, v in row.items() if n != "cmp_vs_best_other") >= 3.0 / k - 1e-9
        if 16 % k == 0:  # equal stages: without idle time every worker computes exactly its share
            assert row["cmp_without_idle"]["step_s"] == pytest.approx(3.0 / k)
    # K=2: cmp has no bubble at any N, so its best step is the ideal
    assert result[2]["cmp"]["step_s"] == pytest.approx(1.5)
    # gpipe at its best M=16: (M+K-1)/M x 3/K
    assert result[4]["gpipe"]["step_s"] == pytest.approx(19 / 16 * 3 / 4)


def test_the_committed_json_renders_both_tables() -> None:
    path = ROOT / "docs" / "bench" / "microbatches.json"
    record = json.loads(path.read_text())
    text = tables_from_json(path)
    assert text.count("| K |") == 2
    for k in record["projection"]:
        assert f"| {k} | " in text
