"""The GPU smoke script, run on the CPU: every check passes there, and a broken launch fails only its own scenario."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_cmp.bench import gpu_smoke

FAST = [*gpu_smoke.CHECKS, *gpu_smoke.SCENARIOS]  # all but the Trainer fit (its own, slow test)


def test_every_check_passes_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))  # as on the GPU machine: the JSON goes to $OUT
    assert gpu_smoke.main(["--device", "cpu", "--only", *FAST]) == 0
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    rows = {row["check"]: row for row in report["rows"]}
    assert list(rows) == FAST
    failed = {name: row["detail"] for name, row in rows.items() if row["result"] != "PASS"}
    assert not failed
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    table = capsys.readouterr().out
    assert "pipeline_gpipe_k2" in table and "pipeline_spectrain_k2" in table and "PASS 15 / FAIL 0 / SKIP 0" in table


@pytest.mark.slow
def test_the_trainer_check_passes_on_cpu() -> None:
    (row,) = gpu_smoke.run_checks("cpu", only=["trainer_fit"])
    assert row["result"] == "PASS", row["detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the checks would run")
def test_without_a_gpu_the_environment_fails_and_the_rest_is_skipped() -> None:
    rows = gpu_smoke.run_checks("cuda")
    assert rows[0]["check"] == "environment" and rows[0]["result"] == "FAIL"
    assert "CUDA not available" in rows[0]["detail"]
    assert {r["result"] for r in rows[1:]} == {"SKIP"}
    assert [r["check"] for r in rows] == [*FAST, "trainer_fit"]


def _progress(
    directory: str, rank: int, done: dict[str, Any], scenario: str | None = None, op: str | None = None
) -> None:
    path = Path(directory) / f"rank{rank}.json"
    path.write_text(json.dumps({"rank": rank, "scenario": scenario, "op": op, "done": done}))


def test_a_broken_launch_fails_its_scenario_and_the_rest_run_in_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """No processes: a stand-in for run_workers writes what the workers would have recorded, then raises."""
    launches: list[list[str]] = []
    ok = {"ok": True, "detail": "fine"}

    def fake_run_workers(fn: Any, world: int, timeout: float, scenarios: list[str], device: str, progress: str) -> Any:
        launches.append(list(scenarios))
        if scenarios[0] == "a":  # a passes; b raises on rank 0 while rank 1 waits for it
            _progress(
                progress, 0, {"a": ok, "b": {"ok": False, "raised": True, "detail": "RuntimeError: no (in send)"}}
            )
            _progress(progress, 1, {"a": ok}, "b", "recv")
            raise AssertionError("worker failed\nrank 0:\nTraceback ...")
        if scenarios[0] == "c":  # c: a worker dies mid-way (no error of its own)
            _progress(progress, 0, {}, "c", "all_gather")
            _progress(progress, 1, {}, "c", "broadcast")
            raise RuntimeError("worker(s) died without reporting (rank: exit code) {1: -11}")
        if scenarios[0] == "d":  # d: one rank compares wrong, without raising; e passes
            _progress(progress, 0, {"d": ok, "e": ok})
            _progress(progress, 1, {"d": {"ok": False, "detail": "weights differ"}, "e": ok})
            return [None, None]
        raise AssertionError(scenarios)

    monkeypatch.setattr(gpu_smoke, "run_workers", fake_run_workers)
    rows = list(gpu_smoke._scenario_rows(["a", "b", "c", "d", "e"], torch.device("cpu"), 60, time.monotonic() + 600))
    assert launches == [["a", "b", "c", "d", "e"], ["c", "d", "e"], ["d", "e"]]
    assert [(r["check"], r["result"]) for r in rows] == [
        ("a", "PASS"),
        ("b", "FAIL"),
        ("c", "FAIL"),
        ("d", "FAIL"),
        ("e", "PASS"),
    ]
    assert rows[1]["detail"] == "rank 0: RuntimeError: no (in send)"
    assert rows[2]["detail"] == (
        "RuntimeError: worker(s) died without reporting (rank: exit code) {1: -11}; "
        "rank 0 in 'all_gather', rank 1 in 'broadcast'"
    )
    assert rows[3]["detail"] == "rank 1: weights differ"


def test_no_launch_once_the_budget_is_spent() -> None:
    rows = list(gpu_smoke._scenario_rows(["a"], torch.device("cpu"), 60, deadline=time.monotonic()))
    assert rows == [
        {"check": "a", "result": "SKIP", "detail": "not run: the smoke test's time budget (--budget) is spent"}
    ]


def test_a_worker_error_is_told_by_its_last_traceback_line() -> None:
    error = AssertionError("worker failed\nrank 1:\nTraceback (most recent call last):\n  File x\nValueError: bad\n")
    assert gpu_smoke._launch_error(error) == "rank 1: ValueError: bad"
    assert gpu_smoke._launch_error(TimeoutError("workers [0] did not finish\nmore")) == (
        "TimeoutError: workers [0] did not finish"
    )
