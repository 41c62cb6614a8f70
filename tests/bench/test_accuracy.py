"""The accuracy runner's orchestration: one quickstart per method and seed, the summary and the exit code.

The quickstart itself runs end to end in tests/test_quickstart.py; here ``subprocess.run`` is replaced so the test
checks what the runner asks for and what it makes of the answers, in milliseconds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lightning_cmp.bench import accuracy


def _fake_quickstart(results: Mapping[tuple[str, str], float | None], calls: list[list[str]]) -> Any:
    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        key = (command[command.index("--strategy") + 1], command[command.index("--seed") + 1])
        acc = results[key]
        if acc is None:
            return subprocess.CompletedProcess(command, 1, "", "boom")
        stdout = f"test accuracy: {acc}\ntraining throughput: 100.0 samples/s\n"
        return subprocess.CompletedProcess(command, 0, stdout, "")

    return run


def test_seeds_summary_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    results = {("auto", "0"): 0.80, ("auto", "1"): 0.84, ("cmp", "0"): 0.81, ("cmp", "1"): 0.82}
    calls: list[list[str]] = []
    monkeypatch.setattr(accuracy.subprocess, "run", _fake_quickstart(results, calls))
    out = tmp_path / "acc.json"
    argv = ["--epochs", "2", "--limit-train", "0", "--runs", "single device", "cmp (gradient)"]
    accuracy.main([*argv, "--seeds", "0", "1", "--json", str(out)])

    assert len(calls) == 4
    assert all(c[c.index("--epochs") + 1] == "2" and c[c.index("--limit-train") + 1] == "0" for c in calls)
    summary = {row["label"]: row for row in json.loads(out.read_text())["summary"]}
    assert summary["single device"]["mean"] == pytest.approx(0.82)
    assert summary["cmp (gradient)"]["mean"] == pytest.approx(0.815)
    # gap per seed: +0.01 and -0.02 -> mean -0.005
    assert summary["cmp (gradient)"]["gap"] == pytest.approx(-0.005)
    printed = capsys.readouterr().out
    assert "| cmp (gradient) | 2 | 81.50 % |" in printed
    assert "-0.50 |" in printed


def test_a_failed_run_is_reported_and_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    results = {("auto", "0"): 0.80, ("cmp", "0"): None}
    monkeypatch.setattr(accuracy.subprocess, "run", _fake_quickstart(results, []))
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--runs", "single device", "cmp (gradient)"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "| cmp (gradient) | 0 | failed |" in captured.out
    assert "cmp (gradient), seed 0 failed" in captured.err and "boom" in captured.err
