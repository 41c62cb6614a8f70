"""lightning_cmp: cross model parallelism for PyTorch Lightning (``Trainer(strategy="cmp")``).

Importing the package registers the strategies (``"cmp"``, ``"mp"``, ``"gpipe"``, ...) with Lightning, both the
``lightning`` and the ``pytorch_lightning`` packages, as soon as they are imported (before or after this one).
The package itself loads neither torch nor Lightning: ``lightning_cmp.schedule`` and the partition solver are
pure Python, and ``CMPStrategy`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_cmp._registration import after_import
from lightning_cmp.errors import (
    CMPConfigError,
    CopiesDriftedError,
    MicrobatchLossMismatch,
    PartitionError,
    ScheduleError,
)

if TYPE_CHECKING:
    from lightning_cmp.strategy import CMPStrategy

__all__ = [
    "CMPConfigError",
    "CMPStrategy",
    "CopiesDriftedError",
    "MicrobatchLossMismatch",
    "PartitionError",
    "ScheduleError",
    "register",
]
__version__ = "0.1.0.dev0"  # keep equal to pyproject.toml


def __getattr__(name: str) -> Any:
    if name == "CMPStrategy":
        from lightning_cmp.strategy import CMPStrategy

        return CMPStrategy
    raise AttributeError(f"module 'lightning_cmp' has no attribute {name!r}")


def _register(strategy_module: str, registry_module: str) -> None:
    """Register ``strategy_module``'s ``CMPStrategy`` with its Lightning package's registry (importing it does);
    nothing while that module is the one importing Lightning (it registers itself when it is done)."""
    import importlib
    import sys

    importing = sys.modules.get(strategy_module)
    if importing is not None and not hasattr(importing, "CMPStrategy"):
        return
    strategy = importlib.import_module(strategy_module).CMPStrategy
    strategy.register_strategies(importlib.import_module(registry_module).StrategyRegistry)


def _register_lightning() -> None:
    _register("lightning_cmp.strategy", "lightning.pytorch.strategies")


def _register_pytorch_lightning() -> None:
    import importlib.util

    if importlib.util.find_spec("pytorch_lightning") is not None:
        _register("lightning_cmp.pytorch_lightning", "pytorch_lightning.strategies")


def register() -> None:
    """Register the strategies in every installed Lightning registry now (importing Lightning if needed).

    Importing the package already arranges it for whenever Lightning is imported; this is for code that wants
    it done eagerly.
    """
    _register_lightning()
    _register_pytorch_lightning()


after_import("lightning.pytorch", _register_lightning)
after_import("pytorch_lightning", _register_pytorch_lightning)
