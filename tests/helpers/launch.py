"""Run a function on K gloo worker processes with a hard timeout, so a deadlock fails fast (tests' default: 180 s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_cmp.bench import launch

__all__ = ["run_workers"]


def run_workers(fn: Callable[..., Any], world: int, timeout: float = 180, **kwargs: Any) -> list[Any]:
    """[`lightning_cmp.bench.launch.run_workers`][] with the test suite's shorter timeout."""
    return launch.run_workers(fn, world, timeout, **kwargs)
