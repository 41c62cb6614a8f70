"""``CMPStrategy`` for the ``pytorch_lightning`` package (``import pytorch_lightning as pl``).

``pl.Trainer`` accepts only strategies built on ``pytorch_lightning``'s own classes, so the class to pass it is
this one, with the same options as `lightning_cmp.CMPStrategy` (the registered names work too:
``pl.Trainer(strategy="cmp")``). Both are `lightning_cmp.strategy.CMPStrategyCore` on their package's
``ParallelStrategy``, with their package's launchers, precision plugins and warning category (`Flavour`).

Examples:
    >>> import pytorch_lightning as pl  # doctest: +SKIP
    >>> from lightning_cmp.pytorch_lightning import CMPStrategy  # doctest: +SKIP
    >>> pl.Trainer(devices=4, strategy=CMPStrategy(num_stages=2, averaging="sharded"))  # doctest: +SKIP
"""

from __future__ import annotations

try:
    import lightning_fabric.utilities.warnings as pl_warnings
    import pytorch_lightning.plugins.precision as pl_precision
    import pytorch_lightning.strategies.launchers as pl_launchers
    from pytorch_lightning.strategies import ParallelStrategy, StrategyRegistry
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "lightning_cmp.pytorch_lightning needs the pytorch_lightning package (pip install pytorch-lightning); "
        "with the lightning package use lightning_cmp.CMPStrategy"
    ) from err

from lightning_cmp.strategy import CMPStrategyCore, Flavour

__all__ = ["CMPStrategy"]


# mypy checks the core against lightning's classes; pytorch_lightning's are the same classes under other names, which
# it reports as incompatible definitions of every shared attribute.
class CMPStrategy(CMPStrategyCore, ParallelStrategy):  # type: ignore[misc]
    """`lightning_cmp.CMPStrategy` for ``pytorch_lightning``'s Trainer: the same options and behaviour."""

    _flavour = Flavour.of(pl_launchers, pl_precision, pl_warnings)


CMPStrategy.register_strategies(StrategyRegistry)
