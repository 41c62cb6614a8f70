"""Asynchronous schedules through the Trainer: several fits in one launch, each compared with the replay by the test.

``python -m tests.helpers.scenario_async '<json config>'`` (``{"out": ..., "devices": 2}``): Lightning starts the
other workers by re-running it. Every rank writes ``<out>/rank<r>.pt`` with, per fit, the weights, the loss logged
after every batch, the global step, the cuts the pipeline ran, and the learning rate of every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_cmp
from tests.helpers.lit import LitCNN, loader

BATCHES = 5  # per epoch: 40 samples in batches of 8, labels different in every batch
LR = 0.05


class LitAsync(LitCNN):
    """The suite's user module; ``halve_every`` adds a StepLR stepped every ``halve_every`` training steps."""

    def __init__(self, halve_every: int = 0) -> None:
        super().__init__(lr=LR)
        self.halve_every = halve_every

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        if not self.halve_every:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.halve_every, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(Callback):
    def __init__(self) -> None:
        self.logged: list[float] = []
        self.rates: list[float] = []
        self.cuts: list[int] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.rates.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.logged.append(float(trainer.callback_metrics["train_loss"]))
        pipeline = getattr(trainer.strategy, "_pipeline", None)
        if pipeline is not None:
            self.cuts = list(pipeline.cuts)


def fit(
    devices: int, module: LitAsync, strategy: Any, ckpt_path: str | None = None, save: Callback | None = None, **kw: Any
) -> tuple[L.Trainer, Recorder]:
    recorder = Recorder()
    options = {"max_epochs": 2, "logger": False, "enable_checkpointing": save is not None, **kw}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder] if save is None else [recorder, save],
        **options,
    )
    val = loader(n=16, seed=3) if kw.get("val_check_interval") else None
    trainer.fit(module, loader(), val, ckpt_path=ckpt_path)
    return trainer, recorder


#: fit name -> (CMPStrategy keyword arguments, LitAsync keyword arguments, Trainer keyword arguments)
FITS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "spectrain": ({"schedule": "spectrain"}, {}, {}),
    "pipedream": ({"schedule": "pipedream", "partition": "uniform"}, {"halve_every": 2}, {}),
    "async": ({"schedule": "async", "partition": "uniform"}, {}, {}),
    # stops in the middle of the second epoch: the pipeline is drained at max_steps
    "max_steps": ({"schedule": "pipedream", "partition": "uniform"}, {}, {"max_steps": BATCHES + 3}),
    # validation after 3 of the 5 batches drains the pipeline; it fills again for the last 2
    "validation": ({"schedule": "spectrain", "partition": "uniform"}, {}, {"max_epochs": 1, "val_check_interval": 3}),
}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out, devices = Path(cfg["out"]), cfg["devices"]
    result: dict[str, Any] = {}
    rank = 0
    for name, (options, module_kw, trainer_kw) in FITS.items():
        module = LitAsync(**module_kw)
        trainer, recorder = fit(devices, module, lightning_cmp.CMPStrategy(**options), **trainer_kw)
        rank = trainer.global_rank
        result[name] = {
            "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "logged": recorder.logged,
            "rates": recorder.rates,
            "cuts": recorder.cuts,
            "global_step": trainer.global_step,
        }
    # ModelCheckpoint after one epoch (a drained point), resume for the second: the uninterrupted run's weights.
    strategy = {"schedule": "spectrain", "partition": "uniform"}
    save = ModelCheckpoint(dirpath=out, filename="epoch1")
    fit(devices, LitAsync(), lightning_cmp.CMPStrategy(**strategy), save=save, max_epochs=1)
    path = out / "epoch1.ckpt"
    module = LitAsync()
    trainer, recorder = fit(devices, module, lightning_cmp.CMPStrategy(**strategy), ckpt_path=str(path))
    uninterrupted = LitAsync()
    fit(devices, uninterrupted, lightning_cmp.CMPStrategy(**strategy))
    result["resume"] = {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "uninterrupted": {k: v.detach().clone() for k, v in uninterrupted.state_dict().items()},
        "global_step": trainer.global_step,
    }
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
