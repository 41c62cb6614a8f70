"""``python -m lightning_cmp.bench.torchvision_sweep``: every torchvision classifier at K=2 against one device.

Each model of ``torchvision.models.list_models(module=torchvision.models)`` is built with random weights at the
smallest input size it accepts, split by the ``balanced`` policy into two stages and trained for a few SGD steps
by two gloo workers (``cmp`` schedule, gradient averaging); the weights are compared with single-process SGD on
the same batches. A model is either trained to the same weights or refused at set-up with an error that names
the reason and the fix; a refused model is tried again with the fix the error names (`FIXES`). Models run
deterministically (`lightning_cmp.bench.zoo`: BatchNorm in eval mode, dropout and stochastic depth off).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.bench.models import make_batches
from lightning_cmp.bench.report import write_json
from lightning_cmp.bench.zoo import (
    BATCH_SIZE,
    LR,
    MOMENTUM,
    STEPS,
    build,
    first_line,
    model_names,
    relative_error,
    smallest_input,
    train_reference,
)
from lightning_cmp.errors import CMPConfigError, PartitionError
from lightning_cmp.partition import Chain, profile_blocks, resolve_cuts, trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.shm import SHM_DIR

__all__ = ["run_cases", "sweep_model", "table"]

#: Largest relative weight difference (max |cmp - single| / max |single| per tensor) that counts as a match.
TOLERANCE = 1e-4
NUM_STAGES = 2
#: What a refusal tells the user to do, per model: the sweep tries each refused model again with it.
FIXES: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


# -- the workers ---------------------------------------------------------------------------------------------
def run_cases(
    rank: int, world: int, cases: list[dict[str, Any]], steps: int = STEPS, batch_size: int = BATCH_SIZE
) -> list[dict[str, Any]]:
    """Worker entry point: train each case split over ``world`` ranks.

    A case: ``{"name", "size", "reference"[, "options", "dtype", "train_batchnorm"]}``; ``reference`` is the path
    of the single-device weights (``torch.save``), None for no comparison.
    """
    return [_run_case(rank, world, steps=steps, batch_size=batch_size, **case) for case in cases]


def _run_case(
    rank: int,
    world: int,
    name: str,
    size: int,
    reference: str | None,
    steps: int,
    batch_size: int,
    options: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    train_batchnorm: bool = False,
) -> dict[str, Any]:
    started = time.perf_counter()
    comm = Comm(list(range(world)), rank, torch.device("cpu"))
    model = build(name, size, options, dtype, train_batchnorm)
    data = [(x.to(dtype), y) for x, y in make_batches(steps, batch_size, size)]
    result: dict[str, Any] = {"name": name, "size": size}
    try:  # set-up: everything the strategy does before the first step
        chain = trace_chain(model, name)
        result.update(blocks=chain.num_blocks)
        cuts = _agreed_cuts(chain, data[0][0], world, comm)
        result.update(cuts=cuts)
        pipe = Pipeline(chain, cuts, "cmp", comm)
    except (PartitionError, CMPConfigError) as err:
        return {**result, "refused": str(err), "seconds": time.perf_counter() - started}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    OptimizerLayout(optimizer, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    for step, (x, y) in enumerate(data):
        loss = F.cross_entropy(pipe(x, step=step), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = pipe.full_state_dict(dst=0)
    pipe.close()
    if state is not None and reference is not None:
        result["max_rel_err"] = relative_error(state, torch.load(reference))
    return {**result, "seconds": time.perf_counter() - started}


def _agreed_cuts(chain: Chain, x: Tensor, world: int, comm: Comm) -> list[int]:
    """As the strategy does: rank 0 profiles the blocks and resolves ``balanced`` cuts; every rank gets them (or
    the same error)."""
    found: tuple[list[int] | None, str | None] = (None, None)
    if comm.me == 0:
        try:
            costs = [f + b for f, b in profile_blocks(chain, x)]
            found = (resolve_cuts("balanced", chain.num_blocks, world, costs, chain.forbidden_cuts()), None)
        except PartitionError as err:
            found = (None, str(err))
    cuts, error = comm.broadcast_object(found, 0)
    if error is not None or cuts is None:
        raise PartitionError(error)
    return cuts


# -- the parent: one model at a time -------------------------------------------------------------------------
def sweep_model(
    name: str,
    workdir: Path,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    timeout: float = 1800,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the table: probe the input size, check the trace, then compare two workers with one process.

    When one process diverges with BatchNorm in eval mode (Inception v3: its activations grow without
    normalisation), BatchNorm runs in training mode, one device normalising each replica's half batch on its own
    (`per_replica`). A float32 difference above `TOLERANCE` is checked again in float64: some models (ReLU
    networks whose BatchNorm does not normalise) turn the last-bit rounding differences of step 1 into visible
    ones at step 2, in one process as well; float64 shows whether the pipeline computes what one device does.
    """
    started = time.perf_counter()
    row: dict[str, Any] = {"model": name + "".join(f" ({k}={v})" for k, v in (options or {}).items())}
    try:
        row["size"] = size = smallest_input(name, options)
        trace_chain(build(name, size, options), name)  # refused here, no reference is needed (nor possible)
    except RuntimeError as err:
        return {**row, "result": f"cannot run here: {err}", "seconds": time.perf_counter() - started}
    except PartitionError as err:
        refused = {"result": f"refused: {first_line(err)}", "refused": str(err)}
        return {**row, **refused, "seconds": time.perf_counter() - started}
    compare = functools.partial(_compare, name, size, dict(options or {}), workdir, steps, batch_size, timeout)
    row.update(compare())
    if row.pop("diverged", False):
        row.update(compare(train_batchnorm=True), train_batchnorm=True)
    if row.get("max_rel_err", 0.0) > TOLERANCE:
        row.update(
            _float64_check(
                row["max_rel_err"], compare(dtype=torch.float64, train_batchnorm=row.get("train_batchnorm", False))
            )
        )
    if row.get("train_batchnorm"):
        row["result"] += "; BatchNorm in training mode (in eval mode one device diverges)"
    return {**row, "seconds": time.perf_counter() - started}


def _float64_check(err32: float, check: dict[str, Any]) -> dict[str, Any]:
    """The result after a float32 difference: what the same comparison gives in float64."""
    err64 = check.get("max_rel_err")
    if err64 is None:  # the check itself could not run (out of memory, one device diverges)
        return {"result": f"DIFFERS (max rel err {err32:.1e}); float64 check: {check['result']}"}
    verdict = "matches in float64" if err64 <= TOLERANCE else "DIFFERS in float64"
    result = f"{verdict} (max rel err {err64:.1e}; float32: {err32:.1e}, rounding amplified by the model)"
    return {"result": result, "max_rel_err_float64": err64}


def _compare(
    name: str,
    size: int,
    options: dict[str, Any],
    workdir: Path,
    steps: int,
    batch_size: int,
    timeout: float,
    dtype: torch.dtype = torch.float32,
    train_batchnorm: bool = False,
) -> dict[str, Any]:
    """Train the single-process reference, then the two workers; the table's columns for the result."""
    reference = train_reference(name, size, steps, batch_size, options, dtype, train_batchnorm)
    if not all(bool(t.isfinite().all()) for t in reference.values() if t.is_floating_point()):
        return {"diverged": True, "result": "one device diverges (weights not finite)"}
    path = workdir / f"{name}.pt"
    torch.save(reference, path)
    del reference
    gc.collect()
    case = {"name": name, "size": size, "reference": str(path), "options": options, "dtype": dtype}
    case["train_batchnorm"] = train_batchnorm
    launched = time.time()
    try:
        first, second = run_workers(run_cases, NUM_STAGES, timeout, cases=[case], steps=steps, batch_size=batch_size)
        return _merge(first[0], second[0])
    except Exception as err:  # reported in the table, the sweep goes on
        _remove_orphan_regions(launched)
        message = _last_line(err)
        if "died without reporting" in message and ": -9}" in message:  # SIGKILL: the kernel's OOM killer here
            return {"result": f"cannot run here: {message}, out of memory ({_memory_gib():.0f} GiB machine)"}
        return {"result": f"FAILED: {message}"}
    finally:
        path.unlink(missing_ok=True)


def _remove_orphan_regions(since: float) -> None:
    """Shared-memory regions of killed workers (a SIGKILL leaves the first exchange's files): they hold memory
    until removed, so the next models would run out of it too. Only files no live process maps are removed."""
    mapped = ""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped += maps.read_text()
    for path in SHM_DIR.glob("lightning_cmp-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= since - 1 and path.name not in mapped:
                path.unlink()


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _rows(name: str, workdir: Path, steps: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The model's row, then, when it is refused and `FIXES` has what the refusal asks for, the fixed model's."""
    row = sweep_model(name, workdir, steps, batch_size)
    yield row
    if "refused" in row and name in FIXES:
        yield sweep_model(name, workdir, steps, batch_size, options=FIXES[name])


def _merge(rank0: dict[str, Any], rank1: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: rank0[k] for k in ("blocks", "cuts", "max_rel_err", "refused") if k in rank0}
    if "refused" in rank0:
        same = rank1.get("refused") == rank0["refused"]
        row["result"] = f"refused: {first_line(rank0['refused'])}" + ("" if same else " (rank 1 differs!)")
    else:
        err = rank0["max_rel_err"]
        row["result"] = f"{'matches' if err <= TOLERANCE else 'DIFFERS'} (max rel err {err:.1e})"
    return row


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the sweep.

    Examples:
        >>> row = {"model": "resnet18", "size": 32, "blocks": 14, "cuts": [7], "result": "matches", "seconds": 9.1}
        >>> print(table([row]))
        | model | input | blocks | cuts | result | time (s) |
        |---|---|---|---|---|---|
        | resnet18 | 32 | 14 | [7] | matches | 9.1 |
    """
    lines = ["| model | input | blocks | cuts | result | time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [
            r["model"],
            r.get("size", ""),
            r.get("blocks", ""),
            r.get("cuts", ""),
            r["result"],
            f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from lightning_cmp.bench.__main__ import machine

    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.torchvision_sweep", description=__doc__)
    p.add_argument("--models", nargs="+", default=None, help="default: every torchvision classification model")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--out", type=Path, default=Path("docs/bench/torchvision_sweep.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)  # the reference runs alone; each worker uses 1 thread
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "command": " ".join(["python -m lightning_cmp.bench.torchvision_sweep", *(argv or sys.argv[1:])]),
        "config": {"num_stages": NUM_STAGES, "schedule": "cmp", "partition": "balanced", "steps": args.steps,
                   "batch_size": args.batch_size, "lr": LR, "momentum": MOMENTUM, "tolerance": TOLERANCE},
        "machine": machine(),
        "rows": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or model_names():
            for row in _rows(name, Path(tmp), args.steps, args.batch_size):
                record["rows"].append(row)
                write_json(record, args.out)  # after every model: a long sweep that stops keeps what it measured
                print(table([row]).splitlines()[-1], flush=True)
    print(table(record["rows"]))


if __name__ == "__main__":
    main()
