"""Registering the strategies with Lightning without importing Lightning (or torch) first.

``import lightning_cmp.schedule`` must stay light (pure Python), yet ``import lightning_cmp`` promises that
``Trainer(strategy="cmp")`` works. So the package registers at once when Lightning is already imported, and
otherwise right after ``lightning.pytorch`` (or ``pytorch_lightning``) finishes importing, through a one-shot
import hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["defer", "register_when_imported", "run_deferred"]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_deferred: list[Callable[[], None]] = []


def defer(callback: Callable[[], None]) -> None:
    """Run ``callback`` when `run_deferred` is called (at the end of the strategy module, while it is importing)."""
    _deferred.append(callback)


def run_deferred() -> None:
    while _deferred:
        _deferred.pop(0)()


def register_when_imported(register: Callable[[], None]) -> None:
    """Call ``register`` now if a Lightning package is imported, else once the first of them is."""
    if any(name in sys.modules for name in _PACKAGES):
        register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(register))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds a Lightning package as the path finder would and runs the callback after its module executed."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name not in _PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if self in sys.meta_path:  # one shot: registering imports the other package too
                sys.meta_path.remove(self)
                self.callback()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
