"""Which rank of a failing job stopped first: a note in the job's store, else a look at the peers' processes.

When one worker dies, its neighbours fail at once and the failure cascades: rank 0 may see rank 1 go away
although rank 2 died first. The first rank to pin the failure on a peer writes that rank into the
rendezvous store; later errors read it. A peer on this host is checked directly (exited, zombie, stopped).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["Processes", "blame", "is_running", "note_lost_rank", "stop_processes", "this_process"]

_NOTE = "lightning_cmp/first_lost_rank"
_SETTLE_S = 1.0  # how long a failing rank looks for the culprit before naming every peer

Processes = dict[int, tuple[str, int]]  # global rank -> (host name, pid)


def this_process() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def blame(me: int, peers: Sequence[int], processes: Processes) -> list[int]:
    """The ranks to name for a failed call between ``me`` and ``peers`` (never empty)."""
    host = socket.gethostname()
    deadline = time.monotonic() + _SETTLE_S
    while True:
        noted = _read_note()
        if noted is not None and noted != me:
            return [noted]
        gone = [r for r in processes if r != me and processes[r][0] == host and not is_running(processes[r][1])]
        if gone or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a killed process closes its sockets a moment before it shows as exited
    # A stopped process (SIGSTOP, a debugger) is the cause; one that exited may be a survivor that ended itself
    # on seeing it (a heartbeat), taking the job's store and its note with it.
    stopped = [r for r in gone if _state(processes[r][1]) in ("T", "t")]
    suspects = stopped or gone or list(peers)
    if len(suspects) == 1:
        _write_note(suspects[0])
    return suspects


def is_running(pid: int) -> bool:
    """False when ``pid`` has exited, is a zombie or is stopped (SIGSTOP, a debugger): it will not answer."""
    state = _state(pid)
    if state is None:  # no /proc (macOS, Windows): fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    return state not in ("Z", "X", "T", "t", "")


def _state(pid: int) -> str | None:
    """The process's state letter from ``/proc`` ("" when it has exited), or None without ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "" if os.path.isdir("/proc/self") else None
    except (OSError, IndexError):
        return None


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> list[int]:
    """Give ``procs`` ``grace_s`` seconds to exit by themselves, then kill and reap the rest; returns their pids.

    A stopped process (SIGSTOP, a debugger) will not exit by itself, so it is not waited for.
    """
    deadline = time.monotonic() + grace_s
    for proc in procs:
        if is_running(proc.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    alive = [proc for proc in procs if proc.poll() is None]
    for proc in alive:
        proc.send_signal(getattr(signal, "SIGKILL", signal.SIGTERM))
        proc.wait()
    return [proc.pid for proc in alive]


def _store() -> Any:
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=2))  # the store lives in rank 0: it may be gone too
        return store
    except Exception:  # no process group, or its store is unreachable
        return None


def _read_note() -> int | None:
    store = _store()
    try:
        if store is not None and store.check([_NOTE]):
            return int(store.get(_NOTE))
    except Exception:
        return None
    return None


def note_lost_rank(rank: int) -> None:
    """Record ``rank`` as the first one lost (the first note wins), so the other ranks' errors name it too."""
    _write_note(rank)


def _write_note(rank: int) -> None:
    store = _store()
    try:
        if store is not None:
            store.compare_set(_NOTE, "", str(rank))  # the first rank to write wins
    except Exception:
        return
