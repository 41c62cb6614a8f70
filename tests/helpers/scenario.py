"""A Trainer run launched like a user's script: ``python -m tests.helpers.scenario '<json config>'``.

Lightning starts the other workers by re-running this command; every rank writes what it saw to
``<out>/rank<r>.pt`` so the test can compare ranks with each other and with single-device training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

import lightning_cmp
from tests.helpers.lit import LitCNN, loader


class Recorder(Callback):
    """Per step: the loss ``training_step`` returned and the value the logger saw."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.logged: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.logged.append(float(trainer.callback_metrics["train_loss"]))


def trainer_for(cfg: dict, out: Path, epochs: int, recorder: Callback | None = None) -> L.Trainer:
    strategy = lightning_cmp.CMPStrategy(
        schedule=cfg.get("schedule", "cmp"),
        averaging=cfg.get("averaging", "gradient"),
        partition=cfg.get("partition", "uniform"),
        num_microbatches=cfg.get("num_microbatches"),
        trace=cfg.get("trace"),
    )
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=out / "ckpt", monitor="val_loss", save_last=True, save_top_k=1),
        EarlyStopping(monitor="val_loss", patience=10),
    ]
    if recorder is not None:
        callbacks.append(recorder)
    return L.Trainer(
        accelerator="cpu",
        devices=cfg["devices"],
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=cfg.get("accumulate", 1),
        gradient_clip_val=cfg.get("clip"),
        num_sanity_val_steps=2,
        precision=cfg.get("precision", "32-true"),
    )


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    model = LitCNN(cfg.get("arch", "sequential"))
    recorder = Recorder()
    trainer = trainer_for(cfg, out, cfg["epochs"], recorder)
    trainer.fit(model, loader(), loader(seed=2))
    result: dict[str, Any] = {
        "losses": recorder.losses,
        "logged": recorder.logged,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "threads": torch.get_num_threads(),
        "logits_dtype": str(model.logits_dtype),
    }
    if cfg.get("evaluate"):
        result["validate"] = trainer.validate(model, loader(seed=2), verbose=False)
        result["test"] = trainer.test(model, loader(seed=3), verbose=False)
        result["predict"] = torch.cat(trainer.predict(model, loader(seed=3)))  # type: ignore[arg-type]
        result["state_after_eval"] = {k: v.clone() for k, v in model.state_dict().items()}
    if cfg.get("resume_epochs"):
        resumed = LitCNN(cfg.get("arch", "sequential"))
        trainer = trainer_for(cfg, out / "resumed", cfg["resume_epochs"])
        trainer.fit(resumed, loader(), loader(seed=2), ckpt_path=str(out / "ckpt" / "last.ckpt"))
        result["resumed_state"] = {k: v.clone() for k, v in resumed.state_dict().items()}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
