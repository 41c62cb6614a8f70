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
    from lightning_fabric.utilities.warnings import PossibleUserWarning
    from pytorch_lightning.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
    from pytorch_lightning.strategies import ParallelStrategy, StrategyRegistry
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "lightning_cmp.pytorch_lightning needs the pytorch_lightning package (pip install pytorch-lightning); "
        "with the lightning package use lightning_cmp.CMPStrategy"
    ) from err

from lightning_cmp.strategy import CMPStrategyCore, Flavour, RestartingLaunch

__all__ = ["CMPStrategy"]


# mypy checks the cores against lightning's classes; pytorch_lightning's are the same classes under other names, which
# it reports as incompatible definitions of every shared attribute (the misc ignores below).
class _RestartingLauncher(RestartingLaunch, _SubprocessScriptLauncher):  # type: ignore[misc]
    """`RestartingLaunch` for ``pytorch_lightning``."""


class CMPStrategy(CMPStrategyCore, ParallelStrategy):  # type: ignore[misc]
    """`lightning_cmp.CMPStrategy` for ``pytorch_lightning``'s Trainer: the same options and behaviour."""

    _flavour = Flavour(
        subprocess_launcher=_SubprocessScriptLauncher,
        multiprocessing_launcher=_MultiProcessingLauncher,
        restarting_launcher=_RestartingLauncher,
        precisions=(Precision, MixedPrecision, HalfPrecision, DoublePrecision),
        possible_user_warning=PossibleUserWarning,
    )


CMPStrategy.register_strategies(StrategyRegistry)
