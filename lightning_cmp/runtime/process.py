"""This process's distributed life: the default group's timeout, torchrun's per-attempt store, the heartbeat it
runs once, and the clean-up at exit. One of each per process, whichever Lightning package's strategy asked.

`mark_failed` after a failure: the group is then left alone at exit (tearing down a group whose peer is hung could
itself hang).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

import torch.distributed as dist

from lightning_cmp.runtime.heartbeat import EXIT_CODE, Heartbeat
from lightning_cmp.runtime.liveness import Processes, stop_processes, this_process

__all__ = [
    "STARTUP_TIMEOUT",
    "destroy_process_group_at_exit",
    "elastic_attempt_store",
    "end_for_lost_peer",
    "mark_failed",
    "register_exit_cleanup",
    "set_group_timeout",
    "watch_heartbeats",
]

log = logging.getLogger(__name__)

#: How long workers wait for each other at start-up (the slowest one to start), whatever ``timeout`` is.
STARTUP_TIMEOUT = timedelta(seconds=120)

# Whether this process registered the clean-up, whether a run in it failed, and its heartbeat.
_state: dict[str, Any] = {"registered": False, "failed": False, "heartbeat": None}


def mark_failed() -> None:
    """A run in this process failed: leave the process group alone at exit."""
    _state["failed"] = True


def set_group_timeout(timeout: timedelta) -> None:
    """Set the default process group's timeout for every later call.

    ``dist.set_timeout`` is public in recent torch (2.14 is tested); an older release without it is tried with
    the private ``_set_pg_timeout`` it replaced, and without either the group keeps the start-up timeout.
    """
    if hasattr(dist, "set_timeout"):
        dist.set_timeout(timeout)
        return
    try:  # pragma: no cover - older torch
        from torch.distributed.distributed_c10d import _set_pg_timeout
    except ImportError:  # pragma: no cover
        log.warning(
            f"this torch cannot change a process group's timeout: a hung worker is given up after "
            f"{STARTUP_TIMEOUT.total_seconds():.0f} s, not the {timeout.total_seconds():.0f} s asked for"
        )
        return
    _set_pg_timeout(timeout)  # pragma: no cover


def elastic_attempt_store(timeout: timedelta | None) -> dict[str, Any]:
    """Under torchrun (the agent hosts the store): the store for this attempt only, as ``init_process_group``'s
    ``store``; elsewhere nothing (Lightning's env:// rendezvous).

    The agent's store outlives a restart (``--max-restarts``), and with it the last attempt's keys: a restarted
    worker could read a dead worker's gloo address and fail to connect. Every worker of an attempt shares its
    ``TORCHELASTIC_RESTART_COUNT``, so prefixing the keys with it gives each attempt a clean namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    if dist.is_initialized():
        return {}
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout or STARTUP_TIMEOUT,
    )
    return {"store": dist.PrefixStore(f"lightning_cmp/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", client)}


def destroy_process_group_at_exit() -> None:
    """Destroy the process group this process created, while the interpreter is still whole.

    Left to interpreter finalization, gloo's worker threads can outlive Python and abort the process
    ("terminate called without an active exception", exit status -6) after a successful run. After a
    failure it is left alone: tearing down a group whose peer is hung could itself hang.
    """
    if not _state["failed"] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def register_exit_cleanup() -> None:
    """Destroy the process group at exit (`destroy_process_group_at_exit`), registered once per process."""
    if not _state["registered"]:
        _state["registered"] = True
        atexit.register(destroy_process_group_at_exit)


def watch_heartbeats(
    on: bool,
    rank: int,
    world_size: int,
    processes: Processes,
    timeout: timedelta,
    on_lost: Callable[[int, str], None],
) -> None:
    """Start this process's heartbeat (once: it beats until the process exits, marking itself done at exit) and
    watch the other workers (``on``: while a Trainer runs) or stop watching (its run is over: the others may be
    finishing, the store's host with them)."""
    heartbeat = _state["heartbeat"]
    if heartbeat is None and on:
        try:
            heartbeat = Heartbeat.connect(rank, list(range(world_size)), processes, timeout, on_lost=on_lost)
        except RuntimeError as err:  # a process group made by the user on a store that is not TCP (file://)
            log.warning("lightning_cmp: heartbeats are off (%s); a hung worker is found after `timeout`", err)
            _state["heartbeat"] = False
            return
        _state["heartbeat"] = heartbeat
        atexit.register(heartbeat.stop)  # a clean exit is never taken for a fault
    if heartbeat:
        heartbeat.watch(on)


def end_for_lost_peer(
    me: int, rank: int, message: str, launched: Sequence[subprocess.Popen], processes: Processes
) -> NoReturn:
    """What a worker does when the heartbeat thread finds rank ``rank`` lost: report ``message``, stop the workers
    this process ``launched`` and the lost worker when it runs on this host (a stopped one would outlive the job and
    a restart's wait), and end this process at once (its main thread may wait in a collective until ``timeout``)."""
    print(f"[rank {me}] PeerLostError: {message}", file=sys.stderr, flush=True)
    mark_failed()
    stop_processes(launched, grace_s=0.0)
    host, pid = processes.get(rank, ("", 0))
    if pid and host == this_process()[0]:
        with contextlib.suppress(OSError):
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    os._exit(EXIT_CODE)
