"""lightning_cmp: cross model parallelism for PyTorch Lightning (``Trainer(strategy="cmp")``).

Importing the package registers the strategies ``"cmp"``, ``"mp"`` and ``"gpipe"`` with Lightning (both the
``lightning`` and the ``pytorch_lightning`` packages, when installed): at once when Lightning is already
imported, else as soon as it is. The package itself loads neither torch nor Lightning, so the pure layers
(``lightning_cmp.schedule``) import without them; ``CMPStrategy`` is loaded on first use.
"""

import sys
from typing import TYPE_CHECKING, Any

from lightning_cmp._register import defer, register_when_imported
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
    if name == "CMPStrategy":  # the Lightning glue, loaded on first use
        from lightning_cmp.strategy import CMPStrategy

        return CMPStrategy
    raise AttributeError(f"module 'lightning_cmp' has no attribute {name!r}")


def register() -> None:
    """Register the strategies in every installed Lightning registry (done once, when Lightning is imported)."""
    glue = sys.modules.get("lightning_cmp.strategy")
    if glue is not None and not hasattr(glue, "CMPStrategy"):  # Lightning imported by it, half-way: it calls back
        defer(register)
        return
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_cmp.strategy import CMPStrategy

    CMPStrategy.register_strategies(StrategyRegistry)
    from lightning_cmp._mirror import load_twin

    twin = load_twin()
    if twin is not None:
        from pytorch_lightning.strategies import StrategyRegistry as PLStrategyRegistry

        twin.CMPStrategy.register_strategies(PLStrategyRegistry)


register_when_imported(register)
