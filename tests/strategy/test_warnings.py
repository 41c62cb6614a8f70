"""No warning a user of the strategy cannot act on; the ones that apply stay."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities._pytree import _tree_flatten

from lightning_cmp import CMPStrategy

SYNC = (
    "It is recommended to use `self.log('train_loss', ..., sync_dist=True)` when logging on epoch level in "
    "distributed setting to accumulate the metric across devices."
)


def _messages(strategy: CMPStrategy | None) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if strategy is not None:
            strategy._quiet_inapplicable_warnings()
        _tree_flatten(1)  # Lightning's CombinedLoader helper; torch 2.14 deprecates the LeafSpec it builds
        warnings.warn(SYNC, PossibleUserWarning, stacklevel=1)  # Lightning's text (logger_connector/result.py)
    return [str(w.message) for w in seen]


@pytest.mark.parametrize(("devices", "num_stages", "sync_applies"), [(2, 2, False), (4, 2, True)])
def test_inapplicable_warnings_are_hidden(devices: int, num_stages: int, sync_applies: bool) -> None:
    before = _messages(None)
    assert any("sync_dist" in m for m in before)
    strategy = CMPStrategy(num_stages=num_stages)
    L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False)  # the worker count
    after = _messages(strategy)
    assert not any("LeafSpec" in m for m in after), after
    # one pipeline: every rank already holds the same value; several: syncing over them is what the user wants
    assert any("sync_dist" in m for m in after) == sync_applies, after
    if not any("LeafSpec" in m for m in before):
        pytest.skip("this torch does not deprecate LeafSpec: only the sync_dist half was checked")
