"""Data-parallel pipelines through the Trainer, launched like a user's script:
``python -m tests.helpers.scenario_groups '<json config>'`` (``{"out": ..., "devices": 4}``, or ``"devices": 2,
"num_nodes": 2`` under ``torchrun --nnodes 2``).

Several fits in one launch (one worker start for every case): each case trains ``LitCNN`` on ``devices`` workers
with ``num_stages=2`` and saves, per rank, what it saw; the test compares them with one device on the union of the
pipelines' batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_cmp
from tests.helpers.lit import LitCNN, loader
from tests.helpers.scenario import Recorder

#: (schedule, averaging): each fit of the launch
CASES = [("cmp", "gradient"), ("mp", "gradient"), ("cmp", "parameter")]
BATCH = 8  # per pipeline
EPOCHS = 2


class SeenRows(L.Callback):
    """The first input value of every sample each worker trained on (tells the pipelines' shares apart)."""

    def __init__(self) -> None:
        self.rows: list[float] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.rows += batch[0][:, 0, 0, 0].tolist()


def run(cfg: dict, schedule: str, averaging: str, out: Path) -> dict[str, Any]:
    model = LitCNN()
    recorder, seen = Recorder(), SeenRows()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=cfg["devices"],
        num_nodes=cfg.get("num_nodes", 1),
        strategy=lightning_cmp.CMPStrategy(num_stages=2, schedule=schedule, averaging=averaging, partition="uniform"),
        max_epochs=EPOCHS,
        logger=False,
        callbacks=[recorder, seen, ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader(batch_size=BATCH), loader(batch_size=BATCH, seed=2))
    return {
        "losses": recorder.losses,
        "logged": recorder.logged,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "rows": seen.rows,
        "rank": trainer.global_rank,
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    results = {f"{s}/{a}": run(cfg, s, a, out / f"{s}_{a}") for s, a in CASES}
    rank = results[f"{CASES[0][0]}/{CASES[0][1]}"]["rank"]
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
