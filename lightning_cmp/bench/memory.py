"""``python -m lightning_cmp.bench.memory``: what each worker holds while a large CNN trains, for every method.

Every run trains the same CNN (built in ``configure_model``; 313 MB of float32 weights) for ``--steps`` steps
with SGD + momentum and saves one checkpoint at the last step, in fresh worker processes started by Lightning
(``Trainer(accelerator="cpu", devices=K, strategy=...)``). Per worker it reports the bytes of parameters,
gradients and optimizer state at set-up, after every step, at the checkpoint and after ``fit``, the peak bytes
of activations kept for the backward, and the peak RSS; and it checks the target of issue 12: ``cmp`` at K=4
holds at most 1.1 x 2/K of the whole model's state per worker at every point, rank 0 excepted only while it
assembles what the user asked to have whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_cmp.bench.machine import machine
from lightning_cmp.bench.memory_report import markdown_table, target_check, target_lines, whole_state
from lightning_cmp.bench.memory_run import RUNS, LargeModel, launch
from lightning_cmp.bench.report import write_json
from lightning_cmp.partition import balanced_cuts, stage_costs, trace_chain

__all__ = ["main", "model_info", "parse"]

#: runs whose target is checked: (run, what rank 0 may hold whole, as (rank, point) pairs)
TARGETS = {
    "cmp-4": [(0, "checkpoint"), (0, "after fit")],
    "cmp-4-keep-split": [],  # written stage by stage: nothing is assembled whole
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["large", "tiny"], default="large", help="tiny: a seconds-long smoke run")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (DDP: divided among the workers)")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="default: all")
    p.add_argument("--json", type=Path, default=Path("docs/bench/memory.json"))
    p.add_argument("--timeout", type=float, default=900, help="seconds one run may take before it is killed")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 4:
        p.error(f"--steps={args.steps} --batch-size={args.batch_size}: use at least 1 step and a batch of 4")
    return args


def model_info(arch: str, stage_counts: tuple[int, ...] = (2, 4)) -> dict[str, Any]:
    """Parameter bytes of the model and, per K, the cuts that balance parameter bytes over K stages.

    The model is built on the meta device (nothing allocated), as Lightning's ``configure_model`` hook does
    under a strategy that materialises stage by stage.

    Examples:
        >>> info = model_info("tiny")
        >>> info["parameter_bytes"] == sum(info["stage_bytes"]["2"]), len(info["cuts"]["4"])
        (True, 3)
    """
    with torch.device("meta"):
        model = LargeModel(arch)
        model.configure_model()
    chain = trace_chain(model, name=arch)
    sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    costs = [sum(sizes[n] for n in chain.stage_state_names(b, b + 1)[0]) for b in range(chain.num_blocks)]
    cuts = {str(k): balanced_cuts(costs, k) for k in stage_counts}
    return {
        "arch": arch,
        "parameter_bytes": sum(sizes.values()),
        "num_blocks": chain.num_blocks,
        "cuts": cuts,
        "stage_bytes": {k: [int(c) for c in stage_costs(costs, v)] for k, v in cuts.items()},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    info = model_info(args.arch)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cmp_memory_") as tmp:
        for name in args.runs:
            run = RUNS[name]
            config = {
                "run": name, "arch": args.arch, "steps": args.steps, "batch_size": args.batch_size,
                "size": args.size, "cuts": info["cuts"], "out": os.path.join(tmp, name),
            }  # fmt: skip
            started = time.perf_counter()
            result = launch(config, timeout=args.timeout)
            rows.append({"run": name, "label": run.label, "workers": run.workers, **result})
            status = result.get("error", "ok")
            print(f"# {name}: {time.perf_counter() - started:.0f} s, {status}", file=sys.stderr, flush=True)
    whole = whole_state(rows, info["parameter_bytes"])
    targets = [target_check(row, whole, TARGETS[row["run"]]) for row in rows if row["run"] in TARGETS]
    record = {
        "command": "python -m lightning_cmp.bench.memory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {**machine(), "memory_gib": _memory_gib()},
        "model": info,
        "whole_state_bytes": whole,
        "rows": rows,
        "targets": targets,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, args.json)
    print(f"## {args.arch} CNN, {info['parameter_bytes'] / 2**20:.0f} MiB of parameters, {args.steps} steps, "
          f"global batch {args.batch_size}; MiB per worker\n")  # fmt: skip
    print(markdown_table(rows, whole))
    print()
    print("\n".join(target_lines(targets)))
    print(f"\nJSON: {args.json}")


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


if __name__ == "__main__":
    main()
