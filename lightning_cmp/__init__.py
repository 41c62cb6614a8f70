"""lightning_cmp: cross model parallelism for PyTorch Lightning (``Trainer(strategy="cmp")``).

Importing the package registers the strategies ``"cmp"``, ``"mp"`` and ``"gpipe"`` with Lightning (both the
``lightning`` and the ``pytorch_lightning`` packages, when installed).
"""

from lightning_cmp.errors import (
    CMPConfigError,
    CopiesDriftedError,
    MicrobatchLossMismatch,
    PartitionError,
    ScheduleError,
)
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


def register() -> None:
    """Register the strategies in every installed Lightning registry (done once at import)."""
    from lightning.pytorch.strategies import StrategyRegistry

    CMPStrategy.register_strategies(StrategyRegistry)
    from lightning_cmp._mirror import load_twin

    twin = load_twin()
    if twin is not None:
        from pytorch_lightning.strategies import StrategyRegistry as PLStrategyRegistry

        twin.CMPStrategy.register_strategies(PLStrategyRegistry)


register()
