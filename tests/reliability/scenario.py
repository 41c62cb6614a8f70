"""Runs that fail on purpose: ``python -m tests.reliability.scenario '<json config>'``.

Every rank writes ``<out>/rank<r>.pt`` (final state, global step at the start and end, per successful run)
and, when a run fails,
``<out>/rank<r>-<run name>.json`` (``error``: the exception's type and message, ``t``: when it was caught).
Config keys (all optional except ``out``, ``devices`` and ``runs``):

- ``runs``: a list of fits done one after the other in this launch, each a dict with ``name``, ``averaging``,
  ``epochs``, ``resume`` (a run name: this fit checkpoints into that run's folder and resumes with
  ``fit(ckpt_path="last")``, as a user re-running the same script would) and the keys below;
- ``kill``: ``{"rank": r, "epoch": e, "batch": b, "how": h, "at": a}``, ``h`` one of ``"sigkill"``,
  ``"sigstop"`` (hung), ``"raise"``, ``"killpg"`` (the whole job); ``a`` (default ``"batch_start"``) is
  ``"batch_start"`` (that batch's start), ``"epoch_end"`` (``on_train_epoch_end`` of epoch ``e``, before
  ``ModelCheckpoint`` saves), ``"save"`` (``on_save_checkpoint`` in epoch ``e``: while checkpointing) or
  ``"setup"`` (the ``setup`` hook: before ``ModelCheckpoint.setup`` broadcasts its folder, no pipeline yet);
- ``nan_step``: from this global step on the module feeds NaN inputs; ``inf_step``: from this step on its loss
  overflows to +inf; ``detect_anomaly`` is passed to the Trainer;
- ``same_data``: false gives every rank its own shuffled sampler with ``use_distributed_sampler=False``;
- ``dict_batch``: batches are nested dicts (with a string field) that ``training_step`` unpacks;
- ``expect_error``: go on with the next run when this one fails (on every rank alike);
- ``busy``: ``{"rank": r, "batch": b, "seconds": s}``: that rank spends ``s`` seconds in ``training_step`` of
  batch ``b`` of the first epoch (alive but busy: the others wait in the step's first collective);
- ``timeout`` (top level): ``CMPStrategy(timeout=...)`` in seconds; ``heartbeat_timeout`` (top level): likewise;
- ``max_restarts`` (top level): ``CMPStrategy(max_restarts=...)`` (the script re-runs under torch's agent);
- ``num_stages`` (top level): ``CMPStrategy(num_stages=...)``; fewer than ``devices`` trains data-parallel pipelines;
- ``start_delay`` (top level): seconds every rank but 0 sleeps before its first fit (a worker slow to start).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import lightning_cmp
from tests.helpers.lit import LitCNN, loader


class NaNAfter(LitCNN):
    """Feeds NaN inputs from global step ``nan_step`` on, like a corrupt sample would; from ``inf_step`` on
    the loss overflows to +inf (as an unscaled fp16 loss or a log of zero would)."""

    def __init__(self, nan_step: int | None = None, inf_step: int | None = None) -> None:
        super().__init__()
        self.nan_step, self.inf_step = nan_step, inf_step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.nan_step is not None and self.global_step >= self.nan_step:
            x = torch.full_like(x, float("nan"))
        loss = super().training_step((x, y), batch_idx)
        if self.inf_step is not None and self.global_step >= self.inf_step:
            loss = loss * float("inf")
        return loss


class DictBatch(NaNAfter):
    """A user's module whose batches are nested dicts: it unpacks them and calls the split model on a tensor."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:  # type: ignore[override]
        return super().training_step((batch["image"], batch["target"]["label"]), batch_idx)


class _DictDataset(TensorDataset):
    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        x, y = super().__getitem__(index)
        return {"image": x, "target": {"label": y}, "id": f"sample-{index}"}


def dict_loader() -> DataLoader:
    """``loader()``'s samples in the same order, as nested dicts with a non-tensor field."""
    plain = loader()
    ds = _DictDataset(*plain.dataset.tensors)  # type: ignore[attr-defined]
    return DataLoader(ds, batch_size=8, sampler=plain.sampler)


class Fault(Callback):
    """Kills or fails one rank (or the whole process group) at one point of training (see ``at``)."""

    def __init__(self, rank: int, epoch: int, how: str, out: Path, batch: int = 0, at: str = "batch_start") -> None:
        self.rank, self.epoch, self.batch, self.how, self.out, self.at = rank, epoch, batch, how, out, at

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.at == "setup":
            self._strike(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.at == "batch_start" and batch_idx == self.batch:
            self._strike(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "epoch_end":
            self._strike(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.at == "save":
            self._strike(trainer)

    def _strike(self, trainer: L.Trainer) -> None:
        if trainer.current_epoch != self.epoch or (self.out / "fault.json").exists():
            return  # once per scenario: a restarted job (torchrun --max-restarts) passes the same point again
        if self.how == "killpg":  # the whole job dies at once, as on a node failure
            if trainer.global_rank == 0:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(60)  # the other ranks wait to be killed rather than run ahead
        if trainer.global_rank != self.rank:
            return
        (self.out / "fault.json").write_text(json.dumps({"rank": self.rank, "how": self.how, "t": time.time()}))
        if self.how in ("sigkill", "sigstop"):  # dead, or alive but hung (never answers again)
            os.kill(os.getpid(), signal.SIGKILL if self.how == "sigkill" else signal.SIGSTOP)
        raise RuntimeError(f"injected failure on rank {self.rank}")


class Busy(Callback):
    """One rank stays busy (sleeping, as a long computation would) for ``seconds`` at the start of one batch."""

    def __init__(self, rank: int, batch: int, seconds: float, out: Path) -> None:
        self.rank, self.batch, self.seconds, self.out = rank, batch, seconds, out

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == 0 and batch_idx == self.batch:
            start = time.time()
            time.sleep(self.seconds)
            (self.out / "busy.json").write_text(json.dumps({"rank": self.rank, "start": start, "end": time.time()}))


class Start(Callback):
    """The global step training started from (not 0 when resumed from a checkpoint)."""

    global_step = -1
    first_step_at = 0.0  # time.time() when the first step of this fit ended

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.global_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.first_step_at = self.first_step_at or time.time()


class Copies(Callback):
    """Each rank's stage copies at the end of training, keyed (replica, stage), to check they stay identical."""

    def __init__(self) -> None:
        self.copies: dict[str, dict[str, Tensor]] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pipeline = trainer.strategy._pipeline  # type: ignore[attr-defined]
        for (replica, stage), c in pipeline.copies.items():
            self.copies[f"{replica},{stage}"] = {k: v.detach().clone() for k, v in c.module.state_dict().items()}


def per_rank_loader(rank: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(40, 3, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g))
    return DataLoader(ds, batch_size=8, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(rank)))


def fit(cfg: dict, run: dict, out: Path) -> dict[str, Any]:
    devices = cfg["devices"]
    timeout = timedelta(seconds=cfg["timeout"]) if "timeout" in cfg else lightning_cmp.strategy.DEFAULT_TIMEOUT
    heartbeat = cfg.get("heartbeat_timeout", lightning_cmp.strategy.DEFAULT_HEARTBEAT_TIMEOUT.total_seconds())
    strategy = lightning_cmp.CMPStrategy(
        averaging=run.get("averaging", "gradient"),
        partition=run.get("partition", "uniform"),
        timeout=timeout,
        num_stages=cfg.get("num_stages"),
        heartbeat_timeout=None if heartbeat is None else timedelta(seconds=heartbeat),
        max_restarts=cfg.get("max_restarts", 0),
    )
    copies, start = Copies(), Start()
    folder = out / run.get("resume", run["name"])
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=folder, save_last=True), copies, start]
    if "kill" in run:
        callbacks.append(Fault(out=out, **run["kill"]))
    if "busy" in run:
        callbacks.append(Busy(out=out, **run["busy"]))
    same_data = run.get("same_data", True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=run.get("epochs", 1),
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        detect_anomaly=run.get("detect_anomaly", False),
        use_distributed_sampler=same_data,
    )
    model = (DictBatch if run.get("dict_batch") else NaNAfter)(run.get("nan_step"), run.get("inf_step"))
    data = loader() if same_data else per_rank_loader(int(os.environ.get("LOCAL_RANK", "0")))
    if run.get("dict_batch"):
        data = dict_loader()
    ckpt = "last" if "resume" in run else None
    try:
        trainer.fit(model, data, ckpt_path=ckpt)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "t": time.time()}
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "copies": copies.copies,
        "global_step": trainer.global_step,
        "start_step": start.global_step,
        "first_step_at": start.first_step_at,
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank > 0:
        time.sleep(cfg.get("start_delay", 0))
    results = {}
    for run in cfg["runs"]:
        results[run["name"]] = result = fit(cfg, run, out)
        if "error" in result:
            (out / f"rank{rank}-{run['name']}.json").write_text(json.dumps(result))
            if not run.get("expect_error"):
                sys.exit(1)
        torch.save(results, out / f"rank{rank}.pt")  # after every run: a later one may kill the job


if __name__ == "__main__":
    main()
