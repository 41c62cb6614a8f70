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

from lightning_cmp.bench import accuracy, time_to_accuracy


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


# --- time to accuracy ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _validations(points: list[tuple[int, float, float, float]]) -> str:
    """The quickstart's lines for (step, accuracy, fit seconds, seconds validating)."""
    return "".join(
        f"val accuracy after step {s} (epoch 1): {a:.4f} at {t:.1f} s ({v:.1f} s validating)\n" for s, a, t, v in points
    )


def test_parse_reads_the_step_lines_and_the_older_epoch_lines() -> None:
    new = _validations([(86, 0.7, 30.0, 1.5), (172, 0.8, 61.0, 3.0)])
    old = "val accuracy after epoch 1: 0.7000 at 30.0 s\nval accuracy after epoch 2: 0.8000 at 61.0 s\n"
    assert accuracy.parse_curve(new) == accuracy.parse_curve(old) == [(30.0, 0.7), (61.0, 0.8)]
    assert accuracy.parse_validations(new) == [(30.0, 0.7, 1.5), (61.0, 0.8, 3.0)]
    assert accuracy.parse_validations(old) == [(30.0, 0.7, None), (61.0, 0.8, None)]
    assert accuracy._threads("threads per process: 2\n") == 2 and accuracy._threads("") is None


def test_ddp_runs_two_workers_on_half_the_batch_each() -> None:
    args = accuracy.RUNS["ddp"]
    assert args[args.index("--strategy") + 1] == "ddp" and args[args.index("--devices") + 1] == "2"
    assert args[args.index("--batch-size") + 1] == "32"  # x 2 workers: the quickstart's global batch of 64
    assert "--batch-size" not in accuracy.RUNS["single device"] + accuracy.RUNS["cmp (gradient)"]


def _fake_with_curves(calls: list[list[str]]) -> Any:
    """cmp reaches every accuracy in 0.8x single device's seconds; seed 1 is 10 % slower than seed 0."""

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        strategy, seed = command[command.index("--strategy") + 1], int(command[command.index("--seed") + 1])
        scale = (0.8 if strategy == "cmp" else 1.0) * (1.1 if seed else 1.0)
        final = {"auto": 0.84, "ddp": 0.83, "cmp": 0.85}[strategy]
        points = [(86 * (i + 1), final - 0.1 * (4 - i), 20.0 * (i + 1) * scale, 1.0 * (i + 1)) for i in range(5)]
        threads = 2 if strategy == "auto" else 1
        stdout = _validations(points) + f"threads per process: {threads}\ntest accuracy: {final}\n"
        return subprocess.CompletedProcess(command, 0, stdout + "training throughput: 100.0 samples/s\n", "")

    return run


def test_time_to_accuracy_run_writes_curves_table_and_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(accuracy.subprocess, "run", _fake_with_curves(calls))
    out, png = tmp_path / "tta.json", tmp_path / "img" / "tta.png"
    runs = ["--runs", "single device", "ddp", "cmp (gradient)", "--seeds", "0", "1"]
    accuracy.main([*runs, "--val-every", "86", "--json", str(out), "--plot", str(png)])

    assert len(calls) == 6 and all(c[c.index("--val-every") + 1] == "86" for c in calls)
    record = json.loads(out.read_text())
    ddp = next(r for r in record["runs"] if r["label"] == "ddp" and r["seed"] == 0)
    assert (ddp["processes"], ddp["threads"], len(ddp["curve"]), ddp["validation_s"][-1]) == (2, 1, 5, 5.0)
    assert record["machine"]["cpus"] and png.is_file() and png.stat().st_size > 10_000
    table = capsys.readouterr().out.split("| method | processes x threads")[1]
    # target: ddp's final 83 %, reached by single device at its 5th validation (median of 100 s and 110 s) and
    # by cmp at its 5th too (0.8x), so cmp is 1.25x single device
    assert "seconds to 83.00 %" in table
    assert "| single device | 1 process x 2 threads | 2 | 84.00 | 105.0 | 5.0 | 1.00x |" in table
    assert "| cmp (gradient) | 2 processes x 1 thread | 2 | 85.00 | 84.0 | 5.0 | 1.25x |" in table

    # --plot-only redraws from the JSON alone, with another target
    png.unlink()
    accuracy.main(["--json", str(out), "--plot", str(png), "--plot-only", "--target", "0.75"])
    assert png.is_file() and "seconds to 75.00 %" in capsys.readouterr().out


def test_the_quickstart_without_val_every_is_asked_nothing_new(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(accuracy.subprocess, "run", _fake_with_curves(calls))
    accuracy.main(["--runs", "cmp (gradient)"])
    assert "--val-every" not in calls[0]


def test_time_to_accuracy_of_the_saved_async_runs() -> None:
    """docs/bench/accuracy_async.json holds per-epoch curves from before the quickstart printed steps, threads and
    seconds spent validating: the table still reads, with n/a where the runs did not say."""
    record = json.loads((ROOT / "docs/bench/accuracy_async.json").read_text())
    target, rows = time_to_accuracy.time_to_accuracy(record)
    finals = {row["label"]: row["final"] for row in rows}
    assert target == min(finals.values()) and all(row["seconds"] is not None for row in rows)
    table = time_to_accuracy.time_to_accuracy_table(record)
    assert "| single device | n/a | 3 |" in table and table.count("\n") == len(rows) + 1


def test_a_target_no_method_reaches_and_runs_without_curves() -> None:
    runs = [{"label": "single device", "curve": [[10, 0.5], [20, 0.6]]}, {"label": "cmp", "curve": [[8, 0.7]]}]
    table = time_to_accuracy.time_to_accuracy_table({"runs": runs}, target=0.65)
    assert "| single device | n/a | 1 | 60.00 | not reached | n/a | n/a |" in table
    assert "| cmp | n/a | 1 | 70.00 | 8.0 | n/a | n/a |" in table
    seeds = json.loads((ROOT / "docs/bench/accuracy_seeds.json").read_text())  # test accuracy only
    assert time_to_accuracy.lacks_curves(seeds) is not None
    with pytest.raises(ValueError, match=r"no run has a validation curve.*--val-every"):
        time_to_accuracy.time_to_accuracy(seeds)
