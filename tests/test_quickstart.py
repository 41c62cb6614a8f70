"""The README's main job (``python -m lightning_cmp.quickstart``, what ``scripts/main.sh`` runs), end to end.

It runs on small IDX files from tests/helpers/idx.py (random pixels, the real file names and format), so it needs
neither the Debian package nor a download; ``tests/test_data.py`` covers reading the real files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.idx import write_fake_fashion_mnist
from tests.helpers.python import run_python


@pytest.mark.timeout(300)
def test_main_job_trains_with_cmp_and_prints_accuracy_and_throughput(tmp_path: Path) -> None:
    # 5,000 training images go to the validation split (the default val_size), so the file needs more.
    write_fake_fashion_mnist(tmp_path, n_train=5100, n_test=100)
    proc = run_python(
        "-m", "lightning_cmp.quickstart", "--data-dir", str(tmp_path),
        "--strategy", "cmp", "--devices", "2", "--epochs", "1",
        "--batch-size", "16", "--limit-train", "96", "--limit-eval", "32", "--val-every", "3",
        timeout=240,
    )  # fmt: skip
    assert "strategy: cmp, devices: 2, arch: resnet18" in proc.stdout
    acc = re.search(r"test accuracy: ([0-9.]+)", proc.stdout)
    assert acc is not None and 0.0 <= float(acc.group(1)) <= 1.0, proc.stdout
    # 6 steps with 5 of warm-up leave one timed step: a rate, not "n/a".
    assert re.search(r"training throughput: [0-9.]+ samples/s", proc.stdout), proc.stdout
    assert "Epoch 0" in proc.stderr + proc.stdout  # Lightning's progress bar ran
    # 6 steps, validated every 3: the points of lightning_cmp.bench.accuracy's time-to-accuracy curve
    assert re.findall(r"val accuracy after step (\d+) \(epoch 1\): [0-9.]+ at [0-9.]+ s", proc.stdout) == ["3", "6"]
    assert "threads per process: 1" in proc.stdout
    # the split chosen on the first batch is shown by default, by rank 0 only: once for fit, once for test
    assert len(re.findall(r"lightning_cmp: \w+ split into 2 stages at blocks \[\d+\]", proc.stderr)) == 2, proc.stderr


def test_val_every_is_a_number_of_steps_and_off_by_default() -> None:
    from lightning_cmp.quickstart import parse_args

    assert parse_args([]).val_every == 0  # validate after each epoch, as before
    assert parse_args(["--val-every", "86"]).val_every == 86
    with pytest.raises(SystemExit):
        parse_args(["--val-every", "-1"])
