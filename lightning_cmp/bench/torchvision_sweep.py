"""``python -m lightning_cmp.bench.torchvision_sweep``: every torchvision classifier at K=2 against one device.

Each model of ``torchvision.models.list_models(module=torchvision.models)`` is built with random weights at the
smallest input size it accepts, split by the ``balanced`` policy into two stages and trained for a few SGD steps
by two gloo workers (``cmp`` schedule, gradient averaging); the weights are compared with single-process SGD on
the same batches. A model is either trained to the same weights or refused at set-up with an error that names
the reason and the fix; a refused model is tried again with the fix the error names (`FIXES`). Models run
deterministically (`lightning_cmp.bench.zoo`: BatchNorm in eval mode, dropout and stochastic depth off).

``--merge [JSON ...]`` keeps the rows of ``--out`` (and takes those of earlier sweeps' JSON files) and replaces
only the rows of the models run now (none without ``--models``), so a sweep can be finished or a model re-run
without running the others again; the JSON lists every command whose rows it holds (`merge`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
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
    per_replica,
    relative_error,
    smallest_input,
    train_reference,
)
from lightning_cmp.errors import CMPConfigError, PartitionError
from lightning_cmp.partition import Chain, profile_blocks, resolve_cuts, trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.shm import SHM_DIR

__all__ = ["merge", "outcome", "run_cases", "summary", "sweep_model", "table"]

#: Largest relative weight difference (max |cmp - single| / max |single| per tensor) that counts as a match.
TOLERANCE = 1e-4
NUM_STAGES = 2
#: What a refusal tells the user to do, per model: the sweep tries each refused model again with it.
FIXES: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}
#: The workers are stopped when the machine has less memory available than this (GiB, `MemAvailable`): nearer
#: the end the kernel evicts every cached page before its OOM killer acts, and a shared machine crawls.
MEMORY_FLOOR_GIB = 1.5


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
    A difference in float64 too is measured against one device's own: how far its float64 weights move when
    every initial weight moves by its last bit (`_last_bit_change`). As far or farther: the model amplifies
    rounding too much for the comparison to tell (``inconclusive``).
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
        train_batchnorm = row.get("train_batchnorm", False)
        row.update(_float64_check(row["max_rel_err"], compare(dtype=torch.float64, train_batchnorm=train_batchnorm)))
        if row.get("max_rel_err_float64", 0.0) > TOLERANCE:
            alone = _last_bit_change(name, size, options, steps, batch_size, train_batchnorm)
            row.update(_against_one_device(row["result"], row["max_rel_err_float64"], alone))
    if row.get("train_batchnorm"):
        row["result"] += "; BatchNorm in training mode (in eval mode one device diverges)"
    return {**row, "seconds": time.perf_counter() - started}


def _float64_check(err32: float, check: dict[str, Any]) -> dict[str, Any]:
    """The result after a float32 difference: what the same comparison gives in float64."""
    err64 = check.get("max_rel_err")
    if err64 is None:  # the check itself could not run (out of memory, one device diverges)
        return {"result": f"DIFFERS (max rel err {err32:.1e}); float64 check: {check['result']}"}
    if err64 > TOLERANCE:  # why: `_against_one_device`
        result = f"DIFFERS in float64 (max rel err {err64:.1e}; float32: {err32:.1e})"
    else:
        result = f"matches in float64 (max rel err {err64:.1e}; float32: {err32:.1e}, rounding amplified by the model)"
    return {"result": result, "max_rel_err_float64": err64}


def _last_bit_change(
    name: str,
    size: int,
    options: Mapping[str, Any] | None,
    steps: int,
    batch_size: int,
    train_batchnorm: bool,
) -> float:
    """How far one device's float64 weights after training move when every initial weight moves by its last bit
    (times ``1 + 2**-52``): what rounding alone does to this model, with no pipeline."""
    reference = train_reference(name, size, steps, batch_size, options, torch.float64, train_batchnorm)
    model = build(name, size, options, torch.float64, train_batchnorm)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 2.0**-52)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in make_batches(steps, batch_size, size):  # as `train_reference`
        x = x.to(torch.float64)
        loss = F.cross_entropy(per_replica(model, x) if train_batchnorm else model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return relative_error({k: v.detach() for k, v in model.state_dict().items()}, reference)


def _against_one_device(result: str, err64: float, alone: float) -> dict[str, Any]:
    """A float64 difference next to one device's own after a last-bit change of its initial weights.

    Examples:
        >>> found = _against_one_device("DIFFERS in float64 (max rel err 9.5e-02)", 0.095, 1.0)
        >>> print(found["result"])  # doctest: +NORMALIZE_WHITESPACE
        inconclusive: DIFFERS in float64 (max rel err 9.5e-02); one device moves as far from itself (max rel err
        1.0e+00) when its initial weights change by their last bit
    """
    change = f"(max rel err {alone:.1e}) when its initial weights change by their last bit"
    if alone >= err64:
        return {
            "result": f"inconclusive: {result}; one device moves as far from itself {change}",
            "one_device_last_bit": alone,
        }
    return {"result": f"{result}; one device moves less from itself {change}", "one_device_last_bit": alone}


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
    _release_freed_memory()
    case = {"name": name, "size": size, "reference": str(path), "options": options, "dtype": dtype}
    case["train_batchnorm"] = train_batchnorm
    launched = time.time()
    try:
        with _memory_floor(MEMORY_FLOOR_GIB) as stopped:
            first, second = run_workers(
                run_cases, NUM_STAGES, timeout, cases=[case], steps=steps, batch_size=batch_size
            )
        return _merge(first[0], second[0])
    except Exception as err:  # reported in the table, the sweep goes on
        _remove_orphan_regions(launched)
        message = _last_line(err)
        if stopped.is_set():
            left = f"less than {MEMORY_FLOOR_GIB} GiB of the {_memory_gib():.0f} GiB machine available"
            return {"result": f"cannot run here: out of memory (workers stopped with {left})"}
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


def _release_freed_memory() -> None:
    """Give back to the system the heap pages the reference's freed tensors leave (glibc keeps them: 1.2 GiB after
    vit_l_16's reference, more than 5 GiB after vit_h_14's), so that the workers launched next can have them."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _memory_floor(gib: float) -> Iterator[threading.Event]:
    """While in the block: when the machine has less than ``gib`` GiB available, this process's children (the
    workers) are killed and the event is set."""
    done, stopped = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            if _available_gib() < gib:
                stopped.set()
                for child in multiprocessing.active_children():
                    child.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield stopped
    finally:
        done.set()
        watcher.join()


def _available_gib() -> float:
    """``MemAvailable``: what the machine can give without swapping (inf where there is no /proc/meminfo)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(line.split()[1]) / 2**20
    return float("inf")


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
    """The Markdown table of the sweep (``<`` and ``|`` in a cell escaped: refusals name ``module='<submodule>'``).

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
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("<", "&lt;") for c in cells) + " |")
    return "\n".join(lines)


#: What each result says, by the start of its text (the longest that fits), and how `summary` counts it.
OUTCOMES = (
    ("matches", "match"),
    ("matches in float64", "match only in float64"),
    ("inconclusive", "inconclusive (one device alone differs as much)"),
    ("refused", "refused"),
    ("cannot run here", "cannot run here"),
    ("DIFFERS", "differ"),
    ("one device diverges", "diverge on one device"),
    ("FAILED", "failed"),
)


def outcome(row: Mapping[str, Any]) -> str:
    """The kind of result of a row (`OUTCOMES`).

    Examples:
        >>> outcome({"result": "matches in float64 (max rel err 2.1e-15; float32: 2.5e-02, ...)"})
        'match only in float64'
    """
    return max((o for o in OUTCOMES if row["result"].startswith(o[0])), key=lambda o: len(o[0]))[1]


def summary(rows: Iterable[Mapping[str, Any]]) -> str:
    """One line counting the rows by `outcome` (kinds with no row left out), in the order of `OUTCOMES`.

    Examples:
        >>> summary([{"result": "matches (max rel err 1e-06)"}, {"result": "refused: no"}])
        '2 rows: 1 match, 1 refused'
    """
    kinds = [outcome(r) for r in rows]
    counts = [f"{kinds.count(kind)} {kind}" for _, kind in OUTCOMES if kind in kinds]
    return f"{len(kinds)} rows: " + ", ".join(counts)


def _model_of(row: Mapping[str, Any]) -> str:
    """The torchvision name of a row's model (``"googlenet (aux_logits=False)"``: ``"googlenet"``)."""
    return str(row["model"]).split(" (")[0]


def _commands(record: Mapping[str, Any]) -> list[str]:
    return list(record["commands"]) if "commands" in record else [record["command"]]


def merge(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """``earlier`` with its rows of the models ``later`` has replaced by ``later``'s: all rows of a model go (a
    refused model's row and its retry's), the other models' rows stay; rows in `model_names` order, then the
    others; ``commands``: every command of both, once. Sweeps with another configuration or machine do not merge.

    Raises:
        ValueError: the two sweeps' ``config`` or ``machine`` differ.

    Examples:
        >>> config, machine = {"steps": 2}, {"cpus": 2}
        >>> old = {"commands": ["a"], "config": config, "machine": machine,
        ...        "rows": [{"model": "vgg11", "result": "FAILED"}, {"model": "alexnet", "result": "matches"}]}
        >>> new = {"commands": ["b"], "config": config, "machine": machine,
        ...        "rows": [{"model": "vgg11", "result": "matches"}]}
        >>> merged = merge(old, new)
        >>> merged["commands"], [(r["model"], r["result"]) for r in merged["rows"]]
        (['a', 'b'], [('alexnet', 'matches'), ('vgg11', 'matches')])
    """
    for key in ("config", "machine"):
        if earlier[key] != later[key]:
            raise ValueError(f"cannot merge sweeps with different {key}s: {earlier[key]} and {later[key]}")
    replaced = {_model_of(r) for r in later["rows"]}
    rows = [r for r in earlier["rows"] if _model_of(r) not in replaced] + list(later["rows"])
    order = {name: i for i, name in enumerate(model_names())}
    rows.sort(key=lambda r: (order.get(_model_of(r), len(order)), _model_of(r)))  # stable: a retry stays second
    commands = _commands(later)
    return {**later, "commands": [c for c in _commands(earlier) if c not in commands] + commands, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    from lightning_cmp.bench.machine import machine

    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.torchvision_sweep", description=__doc__)
    p.add_argument("--models", nargs="+", default=None, help="default: every torchvision classification model")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--out", type=Path, default=Path("docs/bench/torchvision_sweep.json"))
    p.add_argument(
        "--merge", nargs="*", type=Path, default=None, metavar="JSON",
        help="keep the rows of --out if it exists, take those of these earlier sweeps (later files win) and replace "
             "only the rows of the models run now; with --merge the default --models is none",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(2)  # the reference runs alone; each worker uses 1 thread
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "commands": [" ".join(["python -m lightning_cmp.bench.torchvision_sweep", *(argv or sys.argv[1:])])],
        "config": {"num_stages": NUM_STAGES, "schedule": "cmp", "partition": "balanced", "steps": args.steps,
                   "batch_size": args.batch_size, "lr": LR, "momentum": MOMENTUM, "tolerance": TOLERANCE},
        "machine": machine(),
        "rows": [],
    }  # fmt: skip
    earlier: dict[str, Any] | None = None
    if args.merge is not None:
        for path in ([args.out] if args.out.exists() else []) + args.merge:
            found = json.loads(path.read_text())
            earlier = found if earlier is None else merge(earlier, found)
        if earlier is not None:
            merge(earlier, record)  # refused before anything runs: another configuration or machine
    names = args.models if args.models is not None else [] if args.merge is not None else model_names()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for row in _rows(name, Path(tmp), args.steps, args.batch_size):
                record["rows"].append(row)
                write_json(record if earlier is None else merge(earlier, record), args.out)  # after every model:
                print(table([row]).splitlines()[-1], flush=True)  # a long sweep that stops keeps what it measured
    if earlier is not None:
        record = merge(earlier, record)
    write_json(record, args.out)
    print(table(record["rows"]))
    print(summary(record["rows"]))


if __name__ == "__main__":
    main()
