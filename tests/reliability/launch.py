"""Start a scenario in its own session and watch every process of it until the last one is gone."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    returncode: int
    log: str
    gone_at: float  # time.time() when no process of the session was left
    leftovers: list[int]  # pids still alive (then killed) after the deadline
    first_error_at: float | None = None  # time.time() when a PeerLostError first showed in the log (to 0.1 s)


def session_pids(sid: int) -> list[int]:
    pids = []
    """Every process of session ``sid``, zombies included (a zombie is a leftover too)."""
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def launch(module: str, cfg: dict, deadline: float = 240, launcher: tuple[str, ...] = ()) -> Outcome:
    """Run ``python -m module '<cfg>'`` like a user's script; Lightning starts the other ranks from it.

    ``launcher``: arguments before the module, e.g. ``("-m", "torch.distributed.run", "--nproc-per-node=2")`` to
    start it under torchrun."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    log = Path(cfg["out"]) / "launch.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, *launcher, "-m", module, json.dumps(cfg)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        end = time.time() + deadline
        first_error_at = None
        returncode = -999
        while time.time() < end:  # watch the log while waiting: when the first worker reported a lost peer
            if first_error_at is None and "PeerLostError" in log.read_text(errors="replace"):
                first_error_at = time.time()
            code = proc.poll()
            if code is not None:
                returncode = code
                break
            time.sleep(0.1)
        while session_pids(proc.pid) and time.time() < end:
            time.sleep(0.2)
        gone_at = time.time()
        leftovers = session_pids(proc.pid)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    return Outcome(returncode, log.read_text(), gone_at, leftovers, first_error_at)


def record(rows: list[dict], row: dict, env: str) -> None:
    """Add ``row`` to a test module's measured ``rows`` and, when the environment variable ``env`` names a file,
    write them all there (the docs' tables are rendered from those files)."""
    rows.append(row)
    target = os.environ.get(env)
    if target:
        Path(target).write_text(json.dumps(rows, indent=2))
