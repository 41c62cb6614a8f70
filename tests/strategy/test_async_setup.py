"""Asynchronous schedules refuse, at set-up and naming the fix, what they cannot run with single-device meaning."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_cmp import CMPConfigError, CMPStrategy
from tests.helpers.lit import LitCNN, setup_in_process
from tests.helpers.scenario_corners import fp16_plugin


class WithOptimizer(LitCNN):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.parameters())


def _setup(model: L.LightningModule, strategy: CMPStrategy, **trainer_kw: Any) -> None:
    setup_in_process(model, strategy, **trainer_kw)


@pytest.mark.parametrize(
    ("strategy", "trainer_kw", "message"),
    [
        ({"num_microbatches": 2}, {}, r"num_microbatches=2: it trains on whole mini-batches; use 1"),
        ({"partition": "bipartition"}, {}, r"partition='bipartition': use 'balanced', 'uniform' or explicit cut"),
        ({}, {"accumulate_grad_batches": 2}, r"accumulate_grad_batches=2: each stage steps after every mini-batch"),
        ({}, {"gradient_clip_val": 1.0}, r"gradient_clip_val=1.0: .*remove it or use schedule='cmp'"),
        ({}, {"plugins": "fp16"}, r"precision='16-mixed': .*use precision='bf16-mixed' or '32-true'"),
    ],
)
@pytest.mark.parametrize("schedule", ["spectrain", "pipedream", "async"])
def test_what_cannot_keep_its_meaning_is_refused(schedule: str, strategy: dict, trainer_kw: dict, message: str) -> None:
    if trainer_kw.get("plugins") == "fp16":  # Trainer(precision="16-mixed") picks bf16 on the CPU
        trainer_kw = {"plugins": [fp16_plugin()]}
    with pytest.raises(CMPConfigError, match=rf"strategy='{schedule}' cannot run with {message}"):
        _setup(LitCNN(), CMPStrategy(schedule=schedule, **strategy), **trainer_kw)


def test_spectrain_needs_an_optimizer_with_momentum() -> None:
    model = WithOptimizer(lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(CMPConfigError, match=r"strategy='spectrain' predicts .*momentum=0.*strategy='pipedream'"):
        _setup(model, CMPStrategy(schedule="spectrain"))
    _setup(WithOptimizer(lambda p: torch.optim.SGD(p, lr=0.1)), CMPStrategy(schedule="pipedream"))  # no prediction
    _setup(WithOptimizer(lambda p: torch.optim.AdamW(p, lr=0.01)), CMPStrategy(schedule="spectrain"))


def test_manual_optimization_is_refused() -> None:
    model = LitCNN()
    model.automatic_optimization = False
    with pytest.raises(CMPConfigError, match=r"strategy='spectrain' runs the backward itself .*automatic optimization"):
        _setup(model, CMPStrategy(schedule="spectrain"))


def test_strategy_names_are_registered() -> None:
    for name in ("spectrain", "pipedream", "async"):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert isinstance(trainer.strategy, CMPStrategy) and trainer.strategy.schedule == name
