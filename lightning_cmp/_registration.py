"""Run a function as soon as a module has been imported, without importing it (a post-import hook).

``import lightning_cmp`` stays light: the schedule layer and the partition solver are pure Python, and importing
them must not load torch or Lightning. The strategies still have to be in Lightning's registry before a Trainer
looks ``"cmp"`` up, so `after_import` registers them the moment ``lightning.pytorch`` (or ``pytorch_lightning``)
has finished executing: at once if it already has, else from a finder at the front of ``sys.meta_path`` that
wraps that one module's ``exec_module``. The module's loader, spec and contents are left as they were.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["after_import"]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for a watched name it asks the other finders, then wraps the loader's exec_module."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Callable[[], None]]] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.waiting:
            return None
        callbacks = self.waiting.pop(fullname)
        if not self.waiting and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = _find_elsewhere(self, fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader: Any = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            try:
                original(module)
            finally:
                if loader.__dict__.get("exec_module") is exec_module:
                    del loader.exec_module  # back to the class's own method
            for callback in callbacks:
                _run(callback, fullname)

        loader.exec_module = exec_module
        return spec


def _find_elsewhere(
    skip: object, fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if finder is skip or find is None:
            continue
        spec = find(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _run(callback: Callable[[], None], module: str) -> None:
    """A failing registration must not break the user's import of Lightning: it becomes a warning."""
    try:
        callback()
    except Exception as err:  # pragma: no cover - reported, not expected
        warnings.warn(
            f"lightning_cmp could not register its strategies with {module}: {err!r}; pass "
            "strategy=lightning_cmp.CMPStrategy(...) instead of a name",
            RuntimeWarning,
            stacklevel=2,
        )


_FINDER = _AfterImport()


def after_import(module: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once ``module`` (a full dotted name) has been imported: now if it already is.

    Examples:
        >>> seen = []
        >>> after_import("json", lambda: seen.append("json"))  # already imported by doctest: runs now
        >>> seen
        ['json']
    """
    if module in sys.modules:
        _run(callback, module)
        return
    _FINDER.waiting.setdefault(module, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
