"""The memory benchmark: its activation meter, the memory cap, and one end-to-end run on the tiny model (~35 s).

The full runs (``python -m lightning_cmp.bench.memory`` and ``python -m lightning_cmp.bench.memory_cap``, the
313 MB CNN on up to 4 workers) take 10 and 6 minutes here; docs/large-models.md has their commands and results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_cmp.bench.memory_cap import table
from lightning_cmp.bench.memory_probe import ActivationMeter
from lightning_cmp.bench.memory_report import COLUMNS, markdown_table
from tests.helpers.python import ROOT, run_python

POINTS = ["set-up", "step 1", "checkpoint", "end of training", "after fit"]


def _storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_activation_meter_counts_saved_storages_once_and_leaves_out_parameters() -> None:
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(8, 64)
    with ActivationMeter(lambda: _storages(net)) as meter:
        loss = net(x).sum()
    # x (for the first weight's gradient) and the ReLU output (saved by ReLU and by the second linear layer);
    # the weights the linear layers save for the input gradients are parameters
    assert meter.live == meter.peak == 2 * x.numel() * 4
    loss.backward()
    assert meter.live == 0 and meter.peak == 2 * x.numel() * 4
    with meter:
        net(x).sum().backward()
    assert meter.live == 0 and meter.peak == 2 * x.numel() * 4  # the same step again: no new peak


def test_activation_meter_releases_a_graph_that_is_dropped_without_backward() -> None:
    net = nn.Linear(64, 64)
    with ActivationMeter(lambda: _storages(net)) as meter:
        out = net(torch.randn(4, 64, requires_grad=True))
    assert meter.live == 4 * 64 * 4
    del out
    assert meter.live == 0


_CAP = """
import torch
from lightning_cmp.bench.memory_probe import current_mib
from lightning_cmp.bench.memory_run import cap_private_memory
try:
    cap_private_memory(10)
except ValueError as err:
    print("too low:", err)
cap_private_memory(current_mib("VmData") + 100)
torch.zeros(50 * 2**20 // 4)  # 50 MiB: under the cap
try:
    torch.zeros(200 * 2**20 // 4)
except RuntimeError as err:
    print("refused:", err)
"""


def test_the_cap_refuses_an_allocation_past_it_and_a_cap_too_low_to_start() -> None:
    done = run_python("-c", _CAP, timeout=120)
    assert re.search(r"too low: cap_mib=10 is below .* use a cap above \d+ MiB", done.stdout), done.stdout
    assert "refused:" in done.stdout and "can't allocate memory" in done.stdout


def test_memory_report_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    args = ["--arch", "tiny", "--runs", "single", "cmp-2", "--steps", "1", "--json", str(out), "--timeout", "240"]
    done = run_python("-m", "lightning_cmp.bench.memory", *args, timeout=300)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and len(table) == 1 + 1 + 2  # header, single, cmp x 2

    record = json.loads(out.read_text())
    assert {"command", "config", "machine", "model", "whole_state_bytes", "rows", "targets"} <= set(record)
    assert record["machine"]["cpus"] and record["model"]["cuts"]["4"]
    single, cmp = record["rows"]
    assert [single["run"], cmp["run"], cmp["workers"]] == ["single", "cmp-2", 2]
    for row in record["rows"]:
        assert "error" not in row, row["error"]
        for rank, worker in enumerate(row["ranks"]):
            assert worker["rank"] == rank and [p["point"] for p in worker["points"]] == POINTS
            assert worker["peak_activation_bytes"] > 0 and worker["peak_rss_mib"] > 0
            for point in worker["points"]:
                assert point["state"] == point["parameters"] + point["gradients"] + point["optimizer"]
    step = {row["run"]: [worker["points"][1] for worker in row["ranks"]] for row in record["rows"]}
    # SGD with momentum after a step: parameters, gradients and momentum are the same size
    assert step["single"][0]["parameters"] == step["single"][0]["optimizer"] == record["model"]["parameter_bytes"]
    assert record["whole_state_bytes"] == step["single"][0]["state"]
    # at K=2 each cmp worker holds one stage of each replica: the whole model, as one device does
    assert [p["state"] for p in step["cmp-2"]] == [pytest.approx(step["single"][0]["state"], rel=0.01)] * 2
    # each cmp replica runs half the batch
    assert cmp["ranks"][0]["peak_activation_bytes"] < single["ranks"][0]["peak_activation_bytes"]


_BENCH = ROOT / "docs" / "bench"


@pytest.mark.skipif(not (_BENCH / "memory.json").exists(), reason="docs/bench/memory.json not written yet")
def test_the_docs_tables_are_the_ones_the_json_files_give() -> None:
    page = (ROOT / "docs" / "large-models.md").read_text()
    record = json.loads((_BENCH / "memory.json").read_text())
    tables = {"memory.json": markdown_table(record["rows"], record["whole_state_bytes"])}
    for name in ("memory_cap.json", "memory_cap_checkpoint.json"):
        tables[name] = table(json.loads((_BENCH / name).read_text()))
    for name, text in tables.items():
        for line in text.splitlines():
            assert line in page, f"docs/large-models.md: a table differs from docs/bench/{name} at\n{line}"
