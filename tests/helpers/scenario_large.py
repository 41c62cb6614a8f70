"""A model built in ``configure_model`` trained with ``strategy="cmp"``, recording what each worker holds.

``python -m tests.helpers.scenario_large '<json config>'``: Lightning starts the other workers by re-running
it; every rank writes ``<out>/rank<r>.pt`` with its memory records (bytes of parameters, gradients and
optimizer state at set-up, after every step, at the checkpoint and after fit), its states after fit, and the
resumed run's states.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

import lightning_cmp
from lightning_cmp.runtime.memory import held_bytes, tensors_in
from tests.helpers.lit import loader

WIDTH = 64
CONVS = 8
# Blocks: stem conv, relu, then (conv, relu) x 8, pool, flatten, linear. Stage s of 4 gets convs 2s and 2s+1.
CUTS_K4 = [6, 10, 14]


class LitLarge(L.LightningModule):
    """Layers built late, as Lightning's large-model guide says: ``configure_model`` (idempotent)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        layers: list[nn.Module] = [nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU()]
        for _ in range(CONVS):
            layers += [nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, 10)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class MemoryRecorder(Callback):
    """``strategy.worker_bytes()`` at each point of the run; at a checkpoint, also what the file's dict adds."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _record(self, trainer: L.Trainer, point: str, extra: int = 0) -> None:
        held = trainer.strategy.worker_bytes()  # type: ignore[attr-defined]
        self.records.append({"point": point, **held.as_dict(), "checkpoint_extra": extra})

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, "setup")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if trainer.global_step == 0:  # the stages exist now (built at the first forward); no gradients yet
            self._record(trainer, "built")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record(trainer, f"step{trainer.global_step}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        optimizer_state = [t for opt in trainer.optimizers for s in opt.state.values() for t in tensors_in(s)]
        own = [*pl_module.parameters(), *pl_module.buffers(), *optimizer_state]
        extra = held_bytes([*own, *tensors_in(checkpoint)]) - held_bytes(own)
        self._record(trainer, "checkpoint", extra)


def trainer_for(cfg: dict, out: Path, epochs: int, callbacks: list[Callback], **strategy: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=cfg["devices"],
        strategy=lightning_cmp.CMPStrategy(partition=CUTS_K4 if cfg["devices"] == 4 else "uniform", **strategy),
        max_epochs=epochs,
        logger=False,
        callbacks=[ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0), *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    recorder = MemoryRecorder()
    model = LitLarge()
    trainer = trainer_for(cfg, out / "ckpt", 1, [recorder])
    trainer.fit(model, loader())
    after_fit = trainer.strategy.worker_bytes()  # type: ignore[attr-defined]
    result: dict[str, Any] = {
        "memory": [*recorder.records, {"point": "teardown", **after_fit.as_dict(), "checkpoint_extra": 0}],
        "state": _state(model),
    }
    resumed = LitLarge()
    trainer = trainer_for(cfg, out / "resumed", 2, [])
    trainer.fit(resumed, loader(), ckpt_path=str(out / "ckpt" / "last.ckpt"))
    result["resumed_state"] = _state(resumed)
    split, split_recorder = LitLarge(), MemoryRecorder()
    trainer = trainer_for(cfg, out / "split", 1, [split_recorder], keep_split=True)
    trainer.fit(split, loader())
    result["split_state"] = _state(split)
    result["split_memory"] = split_recorder.records
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
