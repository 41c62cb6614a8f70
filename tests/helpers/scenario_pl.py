"""The same user code written against the ``pytorch_lightning`` package: ``python -m tests.helpers.scenario_pl OUT``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

import lightning_cmp  # noqa: F401  (registers "cmp" in pytorch_lightning's registry too)
from tests.helpers.lit import loader
from tests.helpers.models import build


class PLCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build("sequential")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    model = PLCNN()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="cmp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader())
    torch.save(
        {"state": model.state_dict(), "strategy": type(trainer.strategy).__module__},
        Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt",
    )
