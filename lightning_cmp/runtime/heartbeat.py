"""Heartbeats: every worker proves it is alive on the job's store, independently of the training work.

A collective only notices a hung peer (SIGSTOP, a stuck call, a dead node whose socket stays open) when its own
timeout expires, and a short timeout would also cut off legitimately long steps. So each worker runs a daemon
thread that, every ``interval`` seconds, adds one to its counter on the job's rendezvous store (its own client
connection, not the training's) and reads every other worker's counter. A counter that has not moved for
``timeout`` seconds means that worker stopped: its process is stopped, dead, or its host is gone. A worker that is
merely busy (a 10-minute step, profiling, writing a checkpoint) keeps beating: the thread runs whatever the main
thread does, as long as the process runs.

When a worker is declared lost, the survivor writes it into the store (`lightning_cmp.runtime.liveness`: the
errors of the others name the same rank), prints ``[rank r] PeerLostError: ...`` naming the lost rank and its host,
and ends its own process with exit code `EXIT_CODE`: its main thread may be blocked in a collective that will not
return before the collective timeout, and the launcher (Lightning's, torchrun's agent) takes the job down or
restarts it. A worker that stops cleanly marks itself done first, so the others never take its exit for a fault.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lightning_cmp.runtime.liveness import Processes, note_lost_rank

__all__ = ["EXIT_CODE", "Heartbeat", "store_address"]

#: The exit code of a worker that ended itself because another stopped answering its heartbeats.
EXIT_CODE = 75
_PREFIX = "lightning_cmp/heartbeat/"


def store_address(store: Any) -> tuple[str, int] | None:
    """Host and port of the TCP store under ``store`` (prefix stores unwrapped), or None (not a TCP store).

    Examples:
        >>> import torch.distributed as dist
        >>> server = dist.TCPStore("127.0.0.1", 0, 1, True)
        >>> store_address(dist.PrefixStore("job", server)) == ("127.0.0.1", server.port)
        True
    """
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return store.host, store.port
    return None


class Heartbeat:
    """This worker's heartbeat thread: beats on the store and watches the other ``ranks`` (global ranks).

    ``processes`` (rank -> (host, pid)) names the host in the error; ``on_lost(rank, message)`` runs in the thread
    when a rank is lost (default: print the error and end this process with `EXIT_CODE`).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        ranks: list[int],
        processes: Processes,
        timeout: timedelta,
        interval: float | None = None,
        on_lost: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self.rank = rank
        self.others = [r for r in ranks if r != rank]
        self.processes = processes
        self.timeout = timeout.total_seconds()
        self.interval = interval if interval is not None else min(5.0, max(0.2, self.timeout / 6))
        self.on_lost = on_lost or (lambda lost, message: _exit_naming(rank, message))
        self.beats = 0
        self.busy_s = 0.0  # time the thread spent on the store: the heartbeat's whole cost to this worker
        self.lost: int | None = None
        self.watching = True
        self._stop = threading.Event()
        self._restart_clocks = False
        self._thread = threading.Thread(target=self._run, name="lightning_cmp-heartbeat", daemon=True)

    @classmethod
    def connect(cls, rank: int, ranks: list[int], processes: Processes, timeout: timedelta, **kwargs: Any) -> Heartbeat:
        """A heartbeat on its own client of the default process group's TCP store (started)."""
        address = store_address(dist.distributed_c10d._get_default_store())
        if address is None:
            raise RuntimeError("heartbeats need the job's TCP store (env:// or torchrun rendezvous)")
        host, port = address
        wait = timedelta(seconds=max(2.0, timeout.total_seconds() / 3))
        client = dist.TCPStore(host, port, is_master=False, timeout=wait)
        # a restarted job (torchrun --max-restarts) may find the last attempt's keys in the agent's store
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        heartbeat = cls(dist.PrefixStore(f"{_PREFIX}{attempt}/", client), rank, ranks, processes, timeout, **kwargs)
        heartbeat.start()
        return heartbeat

    def start(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)
        self.beats = 1
        self._thread.start()

    def watch(self, on: bool) -> None:
        """Watch the others (while a Trainer runs) or only beat (between runs, and after this worker's last one:
        the others may finish first, and the store's host with them). Watching again starts every clock afresh."""
        if on and not self.watching:
            self._restart_clocks = True
        self.watching = on

    def stop(self) -> None:
        """Mark this worker done (the others stop watching it) and end the thread."""
        with contextlib.suppress(Exception):  # the store may be gone already (its host finished first)
            self.store.set(f"done/{self.rank}", "1")
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5)

    # -- the thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        now = time.monotonic()
        seen = {r: (-1, now) for r in self.others}  # last counter read and when it last moved
        present: list[int] = []  # the ranks whose counter exists (a key, once there, stays)
        store_ok = now
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self._restart_clocks or not self.watching:
                self._restart_clocks = False
                seen = {r: (count, now) for r, (count, _) in seen.items()}
                store_ok = now
            try:
                self.store.add(f"beat/{self.rank}", 1)
                self.beats += 1
                if len(present) < len(self.others):
                    present = [r for r in self.others if r in present or self.store.check([f"beat/{r}"])]
                values = self.store.multi_get([f"beat/{r}" for r in present]) if present else []
                store_ok = now
                self.busy_s += time.monotonic() - now
            except Exception:  # the store did not answer: its host (rank 0 or the agent) may be stopped
                if self.watching and now - store_ok > self.timeout and not self._stop.is_set():
                    self._declare(None, now - store_ok)
                    return
                continue
            for r, value in zip(present, values, strict=True):
                count = int(value)
                if count != seen[r][0]:
                    seen[r] = (count, now)
            for r in self.others:
                silent = now - seen[r][1]
                if self.watching and silent > self.timeout and not self._done(r) and not self._stop.is_set():
                    self._declare(r, silent)
                    return

    def _done(self, rank: int) -> bool:
        try:
            return bool(self.store.check([f"done/{rank}"]))
        except Exception:
            return False

    def _declare(self, rank: int | None, silent: float) -> None:
        if rank is None:
            who = (
                "the job's rendezvous store (hosted by rank 0 under Lightning's launcher, by the agent under torchrun)"
            )
        else:
            host = self.processes.get(rank, ("an unknown host", 0))[0]
            who = f"rank {rank} on {host}"
            note_lost_rank(rank)
        self.lost = rank
        message = (
            f"{who} stopped answering heartbeats: nothing for {silent:.0f} s (heartbeat_timeout="
            f"{self.timeout:g} s). That worker died, was stopped or its host is unreachable; its own error, if any, "
            "is in its log"
        )
        self.on_lost(-1 if rank is None else rank, message)


def _exit_naming(me: int, message: str) -> None:
    """Print the error as the other failures are printed, then end this process: its main thread may be blocked
    in a collective until that collective's own timeout."""
    sys.stderr.write(f"[rank {me}] PeerLostError: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)
