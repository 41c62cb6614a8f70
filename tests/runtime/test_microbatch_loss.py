"""`MicrobatchLoss` in one process: the user's training_step on one microbatch's rows, quietly, and its refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.microbatch import MicrobatchLoss


class Module(nn.Module):
    """A LightningModule's shape: ``training_step`` calls the model (``calls`` times), logs and updates a metric."""

    def __init__(self, calls: int = 1, noise: bool = False) -> None:
        super().__init__()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        self.logged: list[Any] = []
        self.calls, self.noise = calls, noise
        self.model: MicrobatchLoss | None = None  # what `self(x)` reaches under the strategy

    def log(self, *args: Any, **kwargs: Any) -> None:
        self.logged.append(args)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        assert self.model is not None
        x = x + torch.randn_like(x) if self.noise else x
        out = [self.model.forward(x) for _ in range(self.calls)][-1]
        self.accuracy(out, y)
        self.log("loss", 1.0)
        return F.cross_entropy(out, y)


def _loss(module: Module, x: Tensor, y: Tensor, rows: slice, output: Tensor) -> Tensor:
    fn = MicrobatchLoss(module, ((x, y), 0), {}, inputs=x)
    module.model = fn
    return fn(rows, output)


def test_runs_training_step_on_the_rows_quietly() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    x[2, 0] = float("nan")  # a corrupt sample is still the same sample in both calls
    module = Module()
    module.accuracy(torch.randn(6, 3), y)  # an epoch in progress
    before = module.accuracy.compute()
    output = torch.randn(2, 3, requires_grad=True)
    loss = _loss(module, x, y, slice(2, 4), output)
    assert torch.equal(loss, F.cross_entropy(output, y[2:4]))  # the labels of those rows, with that output
    assert module.logged == []  # self.log was muted
    assert torch.equal(module.accuracy.compute(), before) and module.accuracy._update_count == 1  # restored
    module.log("after", 2.0)
    assert module.logged == [("after", 2.0)]  # and unmuted afterwards


@pytest.mark.parametrize(("calls", "noise", "text"), [(2, False, "2 times"), (1, True, "without randomness")])
def test_refuses_what_it_cannot_split(calls: int, noise: bool, text: str) -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(CMPConfigError, match=text):
        _loss(Module(calls, noise), x, y, slice(0, 3), torch.randn(3, 3))
