"""Data-parallel pipelines through the Trainer, launched like a user's script:
``python -m tests.helpers.scenario_groups '<json config>'`` (``{"out": ..., "devices": 4}``, or ``"devices": 2,
"num_nodes": 2`` under ``torchrun --nnodes 2``).

Several fits in one launch (one worker start for every case): each case trains ``LitCNN`` on ``devices`` workers
with ``num_stages=2`` and saves, per rank, what it saw; the test compares them with one device on the union of the
pipelines' batches. A case is ``[schedule, averaging]`` (``CMPStrategy(num_stages=2, ...)``) or a registered
strategy name (``["sharded_dp", ""]``). Optional keys: ``cases``, ``batch`` (the global batch, split over the
pipelines) and ``resume`` (a checkpoint every case resumes from, e.g. one written with another number of pipelines).
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
CASES = [
    ("cmp", "gradient"),
    ("mp", "gradient"),
    ("cmp", "parameter"),
    ("cmp", "sharded"),
    ("mp", "sharded"),
    ("sharded_dp", ""),  # pure data parallelism, one pipeline of one stage per worker
]
BATCH = 16  # the global batch: each of the D pipelines takes BATCH / D samples per step
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
        strategy=lightning_cmp.CMPStrategy(num_stages=2, schedule=schedule, averaging=averaging, partition="uniform")
        if averaging
        else schedule,
        max_epochs=EPOCHS,
        logger=False,
        callbacks=[recorder, seen, ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    strategy = trainer.strategy
    assert isinstance(strategy, lightning_cmp.CMPStrategy)
    batch = cfg.get("batch", BATCH) // strategy.num_groups
    trainer.fit(model, loader(batch_size=batch), loader(batch_size=batch, seed=2), ckpt_path=cfg.get("resume"))
    return {
        "losses": recorder.losses,
        "logged": recorder.logged,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "rows": seen.rows,
        "rank": trainer.global_rank,
        "checkpoints": str(out),
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    cases = cfg.get("cases", CASES)
    results = {f"{s}/{a}": run(cfg, s, a, out / f"{s}_{a}") for s, a in cases}
    rank = results[f"{cases[0][0]}/{cases[0][1]}"]["rank"]
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
