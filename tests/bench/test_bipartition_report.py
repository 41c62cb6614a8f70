"""The Bi-Partition report on a tiny conv net (in process, no ping-pong); the docs' tables from its committed JSON."""

from __future__ import annotations

import importlib.util
import json
import random
from bisect import bisect_right
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_cmp.bench.bipartition import (
    POLICIES,
    SIMULATED,
    measured_table,
    model_report,
    partitions,
    plot,
    split_blocks,
    summarize,
    sweep_table,
    tables_from_json,
)
from lightning_cmp.partition import measured_costs

ROOT = Path(__file__).resolve().parents[2]


def _six_blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    torch.set_num_threads(1)
    x = torch.randn(4, 3, 16, 16)
    model = model_report(_six_blocks(), x, seconds_per_byte=1e-10, ks=[2, 3], repeats=1)
    path = tmp_path_factory.mktemp("bipartition") / "bipartition.json"
    rec = {"models": {"six": model}}
    path.write_text(json.dumps(rec))
    return json.loads(path.read_text()), path


def _check_row(row: dict, k: int, replays: list) -> None:
    """The invariants of one K's row, whatever the timings."""
    for policy in POLICIES:
        assert len(row[policy]["loads_s"]) == k and row[policy]["imbalance"] >= 1.0
    for policy in ("uniform", "balanced"):
        assert row[policy]["forward_cuts"] == row[policy]["backward_cuts"]
    # the optimum over a larger family is never worse: unrestricted <= forward ahead <= layer-wise balanced
    bottleneck = {p: row[p]["bottleneck_s"] for p in POLICIES}
    assert bottleneck == {p: max(row[p]["loads_s"]) for p in POLICIES}
    assert bottleneck["bipartition_unrestricted"] <= bottleneck["bipartition"] + 1e-9
    assert bottleneck["bipartition"] <= bottleneck["balanced"] + 1e-9
    # split blocks only add load, so the mean grows while the slowest worker does not: imbalance falls too
    # (not so between the two Bi-Partition families, whose split charges differ)
    assert row["bipartition"]["imbalance"] <= row["balanced"]["imbalance"] + 1e-9
    for policy in ("bipartition", "bipartition_unrestricted"):
        part = row[policy]
        workers = [
            (bisect_right(part["forward_cuts"], b), bisect_right(part["backward_cuts"], b)) for b in range(len(replays))
        ]
        assert part["split_blocks"] == [b for b, (fw, bw) in enumerate(workers) if fw != bw]
        for column, field in ((0, "replay_s"), (1, "recorded_bytes"), (2, "weight_bytes")):
            owned = [0.0] * k
            for b in part["split_blocks"]:
                owned[workers[b][1]] += replays[b][column]
            assert [w[field] for w in part["per_worker"]] == pytest.approx(owned)
    ahead = row["bipartition"]
    assert all(f >= b for f, b in zip(ahead["forward_cuts"], ahead["backward_cuts"], strict=True))


def test_structure_and_invariants(record: tuple[dict, Path]) -> None:
    rec, _ = record
    model = rec["models"]["six"]
    assert model["blocks"] == 6 and len(model["passes_s"]) == len(model["replays"]) == len(model["extra_s"]) == 6
    assert list(model["k"]) == ["2", "3"]
    ratio = model["bwd_fwd_ratio"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    for k, row in model["k"].items():
        _check_row(row, int(k), model["replays"])
        for name, _, _ in SIMULATED:
            sim = row["simulated"][name]
            assert sim["gain"] == pytest.approx(sim["balanced"] / sim["bipartition"])


def test_invariants_on_costs_that_split() -> None:
    """Timings of a tiny net may or may not call for a split; these costs do (seeded, K=2..5)."""
    rng = random.Random(0)
    splits = 0
    for _ in range(20):
        forward = [rng.uniform(0.1, 1.0) for _ in range(8)]
        replays = [(0.1 * f, rng.randrange(1000), rng.randrange(1000)) for f in forward]
        passes = [(f, rng.uniform(1.0, 3.0) * f) for f in forward]
        costs = measured_costs(passes, replays, seconds_per_byte=1e-5)
        for k in range(2, 6):
            row = partitions(costs, k, replays)
            _check_row(row, k, replays)
            splits += bool(row["bipartition"]["split_blocks"])
    assert splits > 0


def test_split_blocks_are_where_the_cut_lists_differ() -> None:
    assert split_blocks([3, 5], [2, 5]) == [2]
    assert split_blocks([2, 6], [4, 6]) == [2, 3]
    assert split_blocks([1, 2], [1, 2]) == []


def test_tables_render_the_numbers(record: tuple[dict, Path]) -> None:
    rec, path = record
    text = tables_from_json(path)
    for k, row in rec["models"]["six"]["k"].items():
        for policy in POLICIES:
            assert f"{row[policy]['imbalance']:.3f}" in text
        assert f"{row['simulated']['cmp']['gain']:.3f}x" in text
        assert f"| six | {k} |" in text


def test_plots_from_the_json_alone(record: tuple[dict, Path], tmp_path: Path) -> None:
    rec, _ = record
    plot(rec, tmp_path / "imbalance.png", tmp_path / "cuts.png", cuts_model="six", k=3)
    assert (tmp_path / "imbalance.png").stat().st_size > 0 and (tmp_path / "cuts.png").stat().st_size > 0


def test_the_sweep_summary_counts_what_it_says(record: tuple[dict, Path]) -> None:
    rec, _ = record
    summary = summarize({"command": "c", "config": {}, "machine": {}, "seconds_per_byte": 1e-10, "skipped": {}, **rec})
    row = summary["models"]["six"]["k"]["2"]
    assert row["imbalance"] == {p: rec["models"]["six"]["k"]["2"][p]["imbalance"] for p in POLICIES}
    # three models: one that balanced cuts leave at 1.2 and Bi-Partition fixes, one it does not, one already fine
    summary["models"] = {
        name: {"k": {"2": {**row, "imbalance": {**row["imbalance"], "balanced": bal, "bipartition": bip}}}}
        for name, bal, bip in (("a", 1.2, 1.04), ("b", 1.3, 1.2), ("c", 1.01, 1.01))
    }
    text = sweep_table(summary)
    assert "| 2 | 3 | 2 | 1 | 1.200 → 1.040 |" in text


def test_the_measured_table_shows_measured_and_simulated_gains() -> None:
    row = {
        "model": "vgg16", "k": 2, "method": "mp", "split_blocks": [12, 13], "balanced": {"step_s": 1.0},
        "bipartition": {"step_s": 0.8}, "gain_measured": 1.25, "gain_range": [1.1, 1.4], "gain_simulated": 1.2,
        "measured_over_simulated": 1.25 / 1.2,
    }  # fmt: skip
    text = measured_table({"vgg16/2/mp": row})
    assert "| vgg16 | 2 | 12, 13 | mp | 1.0000 | 0.8000 | 1.250 (1.100–1.400) | 1.200 | 1.042 |" in text


@pytest.mark.parametrize("name", ["bipartition.json", "bipartition_torchvision.json"])
def test_the_committed_json_renders(name: str) -> None:
    path = ROOT / "docs" / "bench" / name
    record = json.loads(path.read_text())
    text = tables_from_json(path)
    if record.get("summary"):
        assert text.count("\n") == len({k for m in record["models"].values() for k in m["k"]}) + 1
        return
    assert text.count("| model | K |") == 2 + bool(record.get("measured"))
    for name, model in record["models"].items():
        for k in model["k"]:
            assert f"| {name} | {k} |" in text
    for row in record.get("measured", {}).values():
        assert f"{row['gain_measured']:.3f}" in text and f"{row['gain_simulated']:.3f}" in text


def test_the_docs_marker_expands() -> None:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    path = ROOT / "docs" / "bench" / "bipartition.json"
    page = hooks.on_page_markdown(f"before\n<!-- bipartition json={path} -->\nafter")
    assert "<!--" not in page and page.count("| model | K |") >= 2
