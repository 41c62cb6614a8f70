"""A LightningModule and data for the Trainer-level tests, as a user would write them."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from tests.helpers.models import build

__all__ = ["LitCNN", "loader", "setup_in_process"]


class LitCNN(L.LightningModule):
    def __init__(self, arch: str = "sequential", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build(arch)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.logits_dtype = logits.dtype
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        self.log("train_loss_sum", loss, reduce_fx="sum", sync_dist=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loader(n: int = 40, batch_size: int = 8, seed: int = 1) -> DataLoader:
    """Random 3x16x16 images in a fixed order on every rank (an explicit one-replica sampler, unshuffled)."""
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False))


def setup_in_process(model: L.LightningModule, strategy: Strategy, devices: int = 2, **trainer_kwargs: object) -> None:
    """Run ``strategy``'s set-up checks for ``model`` in this process (they come before any collective)."""
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, logger=False, max_epochs=1, **trainer_kwargs
    )  # type: ignore[arg-type]
    trainer.state.fn = L.pytorch.trainer.states.TrainerFn.FITTING
    model.trainer = trainer
    strategy.connect(model)
    strategy._lightning_module = model  # type: ignore[attr-defined]
    strategy.setup(trainer)
