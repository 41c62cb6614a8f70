"""Run a function on K gloo worker processes (1 thread each) with a hard timeout; results come back by rank."""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from queue import Empty
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_workers"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], kwargs: dict[str, Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, **kwargs)
        # Plain pickle bytes: torch's queue would share tensor storage with a process that is about to exit.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report everything, including assertion failures, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world: int, timeout: float = 600, **kwargs: Any) -> list[Any]:
    """``fn(rank, world, **kwargs)`` on ``world`` processes; returns their results by rank.

    Any worker error is re-raised with its traceback, a worker that dies without reporting fails the call at
    once, and if the workers do not all finish within ``timeout`` seconds they are killed and a
    ``TimeoutError`` names the ranks that did not report. ``fn`` must be
    importable by the spawned workers (a module-level function).

    Examples:
        >>> run_workers(my_module.train, 2, steps=3)  # doctest: +SKIP
        [{'rank': 0, ...}, {'rank': 1, ...}]
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, kwargs, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            try:
                rank, status, payload = queue.get(timeout=0.5)
            except Empty:
                _check_running(procs, results, deadline, timeout)
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


def _check_running(procs: list[Any], results: dict[int, Any], deadline: float, timeout: float) -> None:
    """Fail at once for a worker that died without reporting (crash, import error); at the deadline for all."""
    dead = {r: p.exitcode for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)}
    if dead:
        raise RuntimeError(f"worker(s) died without reporting (rank: exit code) {dead}")
    if time.monotonic() > deadline:
        missing = sorted(set(range(len(procs))) - set(results))
        raise TimeoutError(f"workers {missing} did not finish within {timeout}s (deadlock?)")
