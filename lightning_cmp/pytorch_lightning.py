"""``CMPStrategy`` for the ``pytorch_lightning`` package (``import pytorch_lightning as pl``).

``pl.Trainer`` accepts only strategies built on ``pytorch_lightning``'s own classes, so the class to pass it is
this one, with the same options as `lightning_cmp.CMPStrategy` (the registered names work too:
``pl.Trainer(strategy="cmp")``).

Examples:
    >>> import pytorch_lightning as pl  # doctest: +SKIP
    >>> from lightning_cmp.pytorch_lightning import CMPStrategy  # doctest: +SKIP
    >>> pl.Trainer(devices=4, strategy=CMPStrategy(num_stages=2, averaging="sharded"))  # doctest: +SKIP
"""

from __future__ import annotations

from lightning_cmp._mirror import load_twin

__all__ = ["CMPStrategy"]

_twin = load_twin()
if _twin is None:
    raise ImportError(
        "lightning_cmp.pytorch_lightning needs the pytorch_lightning package (pip install pytorch-lightning); "
        "with the lightning package use lightning_cmp.CMPStrategy"
    )
CMPStrategy = _twin.CMPStrategy
