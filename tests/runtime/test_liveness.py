"""Which rank a failure is pinned on, from the processes on this host (no process group needed)."""

from __future__ import annotations

import signal
import subprocess
import time

from lightning_cmp.runtime.liveness import blame, is_running, this_process


def test_a_stopped_worker_is_named_before_one_that_exited() -> None:
    # A survivor that ended itself on seeing the stopped worker (a heartbeat) has exited too: the stopped one is
    # the cause, and the only one named.
    host = this_process()[0]
    stopped, exited = (subprocess.Popen(["sleep", "30"]) for _ in range(2))
    try:
        stopped.send_signal(signal.SIGSTOP)
        exited.kill()
        exited.wait()
        time.sleep(0.1)
        assert not is_running(stopped.pid) and not is_running(exited.pid)
        processes = {0: this_process(), 1: (host, stopped.pid), 2: (host, exited.pid)}
        assert blame(0, [1, 2], processes) == [1]
        assert blame(0, [2], {0: this_process(), 2: (host, exited.pid)}) == [2]
    finally:
        stopped.kill()
        stopped.wait()
