"""The machine a benchmark figure is from, as every benchmark's JSON records it.

Imports neither torch nor Lightning (their versions come from the installed metadata), and starts no
subprocess (``platform.platform()`` and ``platform.processor()`` run ``uname -p`` in one; ``os.uname()`` does
not), so the drivers that only launch workers can call it too.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["machine"]


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, versions, and the load just before.

    Examples:
        >>> facts = machine()
        >>> facts["cpus"] >= 1 and facts["threads_per_worker"]
        1
    """
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo") if line.startswith("model name")), "")
    memory = next((line.split()[1] for line in _read("/proc/meminfo") if line.startswith("MemTotal")), None)
    system = os.uname()
    return {
        "platform": f"{system.sysname}-{system.release}-{system.machine}",
        "processor": cpu or system.machine,
        "cpus": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1) if memory else None,
        "load_average_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "lightning": _version("lightning"),
        "threads_per_worker": 1,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _read(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
