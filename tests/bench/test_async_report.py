"""The asynchronous benchmark's projection and report (no timing here: the numbers come from synthetic inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_cmp.bench.asynchronous import project_async, tables_from_json
from lightning_cmp.bench.project import StepModel


def _model() -> StepModel:
    costs = {8: [(1.0, 2.0)] * 4}  # four equal blocks, backward twice the forward
    return StepModel(8, costs, [4] * 4, [0] * 4, lambda n: 0.0, 0.0, None)


def test_projection_is_the_steady_state_with_staleness_and_prediction_distances() -> None:
    projected = project_async(_model(), range(2, 5))
    assert projected[2]["seconds_per_batch"] == pytest.approx(6.0)  # two blocks per stage: 2 + 4
    assert projected[2]["staleness"] == [1, 0] and projected[2]["prediction_steps"] == [[1, 0], [0, 0]]
    assert projected[4]["seconds_per_batch"] == pytest.approx(4.0)  # one block per stage: waits for the output
    assert projected[4]["idle_fraction"] == [0.25] * 4


def test_tables_render_from_the_json_files(tmp_path: Path) -> None:
    row = {"method": "mp", "label": "lightning_cmp mp", "samples_per_s": 10.0, "samples_per_s_repeats": [9.0, 11.0]}
    spec = {**row, "method": "spectrain", "label": "spectrain", "samples_per_s": 19.0, "weight_copy_bytes": [2**20, 0]}
    result = {
        "model": "vgg",
        "cuts": [3],
        "rows": [row, spec],
        "best_of": {},
        "projection": {"async_1f1b": {"2": project_async(_model(), range(2, 3))[2]}, "synchronous_s_per_step": {}},
    }
    record = {"machine": {"processor": "x86_64", "cpus": 2, "torch": "2"}, "command": "c", "timed": "t"}
    record |= {"results": [result], "config": {"batch_size": 64}}
    accuracy = {"args": {"epochs": 2, "limit_train": 10000, "seeds": [0, 1]}, "summary": []}
    (tmp_path / "a.json").write_text(json.dumps(record))
    (tmp_path / "b.json").write_text(json.dumps(accuracy))
    text = tables_from_json(tmp_path / "a.json", tmp_path / "b.json")
    assert "| spectrain | 19.0 | 9.0–11.0 | 1.90 | 1.00 / 0.00 |" in text
    assert "| 2 | 6.000 | n/a | n/a | n/a | [1, 0] | (1,0) (0,0) |" in text
    assert "--epochs 2 --limit-train 10000 --seeds 0 1" in text
