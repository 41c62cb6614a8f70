"""Accuracy run: the quickstart's ResNet-18 on Fashion-MNIST with single device, mp and cmp, side by side.

``python -m lightning_cmp.bench.accuracy --epochs 1 --limit-train 10000`` runs
``python -m lightning_cmp.quickstart`` once per method (fresh processes, same seed and data) and prints
each method's final test accuracy and training throughput as a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["RUNS", "main", "parse_result"]

#: (label, quickstart arguments)
RUNS: dict[str, list[str]] = {
    "single device": ["--strategy", "auto", "--devices", "1"],
    "mp": ["--strategy", "mp", "--devices", "2"],
    "cmp (gradient)": ["--strategy", "cmp", "--devices", "2"],
    "cmp (parameter, every 4)": [
        "--strategy",
        "cmp",
        "--devices",
        "2",
        "--averaging",
        "parameter",
        "--average-every",
        "4",
    ],
}


def parse_result(stdout: str) -> dict[str, float | None]:
    """Test accuracy and samples/s from the quickstart's output.

    Examples:
        >>> parse_result("test accuracy: 0.8123\\ntraining throughput: 51.2 samples/s\\n")
        {'test_acc': 0.8123, 'samples_per_s': 51.2}
    """
    acc = re.search(r"test accuracy: ([0-9.]+)", stdout)
    rate = re.search(r"training throughput: ([0-9.]+) samples/s", stdout)
    return {
        "test_acc": float(acc.group(1)) if acc else None,
        "samples_per_s": float(rate.group(1)) if rate else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.accuracy", description=__doc__)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-eval", type=int, default=0)
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = p.parse_args(argv)
    common = [
        "--epochs",
        str(args.epochs),
        "--limit-train",
        str(args.limit_train),
        "--limit-eval",
        str(args.limit_eval),
    ]
    rows = []
    for label in args.runs:
        start = time.perf_counter()
        command = [sys.executable, "-m", "lightning_cmp.quickstart", *RUNS[label], *common]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"# {label} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        result = parse_result(proc.stdout)
        rows.append((label, result, time.perf_counter() - start))
        print(f"# {label}: {result} in {rows[-1][2]:.0f}s", file=sys.stderr)
    print("| method | test accuracy | samples/s | wall s |\n|---|---|---|---|")
    for label, result, seconds in rows:
        acc, rate = result["test_acc"], result["samples_per_s"]
        acc_text = f"{100 * acc:.2f}%" if acc is not None else "failed"
        rate_text = f"{rate:.1f}" if rate is not None else "n/a"
        print(f"| {label} | {acc_text} | {rate_text} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
