"""``python -m lightning_cmp.bench.memory_cap``: under a per-process memory cap, one device and DDP run out of memory
while ``strategy="cmp"`` at K=4 trains the same model.

Every worker process caps its private data with ``resource.setrlimit(RLIMIT_DATA)`` (what ``ulimit -d`` sets; no
privileges needed) before it builds anything, then trains the memory benchmark's CNN (313 MB of weights, built in
``configure_model``) for ``--steps`` steps with SGD + momentum. An allocation past the cap fails with torch's
"can't allocate memory" error, which the worker reports. The command exits 1 unless every run that is not ``cmp``
ran out of memory and a ``cmp`` run trained (``cmp-4-gloo``, whose gradient exchange buffers are private memory
instead of ``/dev/shm``, is there to show what the cap does not count).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning_cmp.bench.memory import model_info
from lightning_cmp.bench.memory_run import RUNS, launch
from lightning_cmp.bench.report import write_json

__all__ = ["DEFAULT_RUNS", "main", "outcome", "table", "verdict"]

DEFAULT_RUNS = ["single", "ddp-2", "ddp-4", "cmp-4", "cmp-4-keep-split", "cmp-4-gloo"]
_CLAIM = "every run that is not cmp must run out of memory, and a cmp run train"
#: what an allocation past RLIMIT_DATA raises: torch's allocator, Python, or C++ code (gloo)
_OUT_OF_MEMORY = ("can't allocate memory", "Cannot allocate memory", "MemoryError", "bad_alloc", "out of memory")


def outcome(result: dict[str, Any]) -> tuple[str, str]:
    """("trained" | "out of memory" | "failed", message) for one run's ``launch`` result.

    Examples:
        >>> outcome({"ranks": [{"points": []}]})
        ('trained', '')
        >>> outcome({"error": "rank 1: RuntimeError: DefaultCPUAllocator: can't allocate memory: ...",
        ...          "ranks": [None, {"points": [{"point": "set-up"}]}]})[0]
        'out of memory'
    """
    error = result.get("error")
    if not error:
        return "trained", ""
    kind = "out of memory" if any(s in error for s in _OUT_OF_MEMORY) else "failed"
    return kind, f"{error} ({_when(result)})"


def _when(result: dict[str, Any]) -> str:
    """Where the failed rank was: after its last recorded point."""
    failed = next((r for r in result["ranks"] if r and "error" in r), None)
    if failed is None or not failed["points"]:
        return "before training started"
    return f"after {failed['points'][-1]['point']}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.memory_cap", description=__doc__.split("\n\n")[0])
    p.add_argument("--cap-mib", type=float, default=1700, help="RLIMIT_DATA of every worker process, MiB")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=DEFAULT_RUNS)
    p.add_argument("--arch", choices=["large", "tiny"], default="large")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint", action="store_true", help="also save a checkpoint at the last step")
    p.add_argument("--timeout", type=float, default=900, help="seconds one run may take before it is killed")
    p.add_argument("--json", type=Path, default=None, help="also write every run's records to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    info = model_info(args.arch)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmp_memory_cap_") as tmp:
        for name in args.runs:
            config = {
                "run": name, "arch": args.arch, "steps": args.steps, "batch_size": args.batch_size, "size": 32,
                "cuts": info["cuts"], "out": os.path.join(tmp, name), "cap_mib": args.cap_mib,
                "checkpoint": args.checkpoint,
            }  # fmt: skip
            result = launch(config, timeout=args.timeout)
            kind, message = outcome(result)
            rows.append({"run": name, "label": RUNS[name].label, "workers": RUNS[name].workers, "result": kind,
                         "message": message, **result})  # fmt: skip
            print(f"# {name}: {kind} in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    shown = verdict(rows)
    record = {"config": {**vars(args), "json": str(args.json)}, "model": info, "rows": rows, "shown": shown}
    print(_title(record))
    print(table(record))
    print(f"\nThe cap example is {'shown' if shown else 'NOT shown'}: {_CLAIM}.")
    if args.json:
        write_json(record, args.json)
    if not shown:
        raise SystemExit(1)


def verdict(rows: list[dict[str, Any]]) -> bool:
    """Whether the runs show the claim: no run failed for another reason than memory, every run that is not
    ``cmp`` ran out of memory, and at least one ``cmp`` run trained.

    Examples:
        >>> verdict([{"run": "single", "result": "out of memory"}, {"run": "cmp-4", "result": "trained"},
        ...          {"run": "cmp-4-gloo", "result": "out of memory"}])
        True
    """
    cmp = [r["result"] for r in rows if RUNS[r["run"]].strategy == "cmp"]
    others = [r["result"] for r in rows if RUNS[r["run"]].strategy != "cmp"]
    return "trained" in cmp and "failed" not in cmp and all(o == "out of memory" for o in others)


def table(record: dict[str, Any]) -> str:
    """The Markdown table of a cap run's record (what ``--json`` writes): one line per method.

    Examples:
        >>> rows = [{"label": "cmp", "workers": 1, "result": "trained", "message": "", "ranks": [{"peak_rss_mib": 9}]}]
        >>> print(table({"config": {"cap_mib": 100}, "rows": rows}).splitlines()[-1])
        | cmp | 1 | 100 MiB | trained | 9 |  |
    """
    cap = record["config"]["cap_mib"]
    lines = [
        "| method | workers | cap per process | result | peak RSS per worker, MiB | message |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        rss = " / ".join(f"{r['peak_rss_mib']:.0f}" if r else "-" for r in row["ranks"])
        message = " ".join(row["message"].split()).replace("|", "/")[:260]
        lines.append(f"| {row['label']} | {row['workers']} | {cap:.0f} MiB | {row['result']} | {rss} | {message} |")
    return "\n".join(lines)


def _title(record: dict[str, Any]) -> str:
    config, rows = record["config"], record["rows"]
    base = [r["base_vm_data_mib"] for row in rows for r in row["ranks"] if r and r.get("base_vm_data_mib")]
    return (
        f"## {config['arch']} CNN ({record['model']['parameter_bytes'] / 2**20:.0f} MiB of parameters), "
        f"{config['steps']} steps, RLIMIT_DATA = {config['cap_mib']:.0f} MiB per process (Python + torch + "
        f"Lightning alone: {min(base, default=0):.0f}-{max(base, default=0):.0f} MiB)\n"
    )


if __name__ == "__main__":
    main()
