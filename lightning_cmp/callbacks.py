"""Callbacks for runs: SamplesPerSecond (median training throughput), PredictionWriter (predictions to CSV)."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["PredictionWriter", "SamplesPerSecond"]


class SamplesPerSecond(L.Callback):
    """Median training throughput (samples/s over all ranks) after a warm-up, measured on rank 0.

    Times each training batch from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
    communication and optimizer step) and counts ``local batch size x data shards``, where the number of
    data shards is the strategy's ``distributed_sampler_kwargs["num_replicas"]`` (1 when it has none).

    Args:
        warmup: training batches to skip before recording (allocator, thread pools, first communication).

    Examples:
        >>> speed = SamplesPerSecond(warmup=5)
        >>> trainer = L.Trainer(callbacks=[speed], max_epochs=1)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> speed.samples_per_second  # doctest: +SKIP
        412.3
    """

    def __init__(self, warmup: int = 5) -> None:
        super().__init__()
        if warmup < 0:
            raise ValueError(f"warmup={warmup} must be >= 0")
        self.warmup = warmup
        self.batch_seconds: list[float] = []
        self.batch_samples: list[int] = []
        self._seen = 0
        self._start: float | None = None

    @property
    def samples_per_second(self) -> float | None:
        """Median over recorded batches of global samples / batch wall time; ``None`` before any record."""
        if not self.batch_seconds:
            return None
        return statistics.median(n / s for n, s in zip(self.batch_samples, self.batch_seconds, strict=True))

    @property
    def seconds_per_batch(self) -> float | None:
        """Median wall time of a recorded training batch; ``None`` before any record."""
        return statistics.median(self.batch_seconds) if self.batch_seconds else None

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        seconds = time.perf_counter() - self._start
        self._start = None
        self._seen += 1
        if self._seen > self.warmup:
            self.batch_seconds.append(seconds)
            self.batch_samples.append(_batch_size(batch) * _data_shards(trainer))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.samples_per_second is None:
            rank_zero_info(f"SamplesPerSecond: no batch measured after {self.warmup} warm-up batches")
            return
        rank_zero_info(
            f"SamplesPerSecond: {self.samples_per_second:.1f} samples/s "
            f"(median of {len(self.batch_seconds)} batches, {self.seconds_per_batch:.3f} s/batch)"
        )


class PredictionWriter(L.Callback):
    """Write what ``predict_step`` returns to a CSV file: one row per sample, in the order of the predict loader.

    Columns: ``index`` (position in the predict loader), ``prediction`` (or ``prediction_0``, ``prediction_1``,
    ... when each sample's output has several values) and ``target`` when the batch is ``(inputs, targets)``.
    ``lightning-cmp predict`` adds this callback itself; in Python, pass it to the Trainer. The file is written
    by rank 0 when every worker sees the whole batch (``cmp``, ``mp``, ``gpipe``, one device); under data
    parallelism (``ddp``) every rank writes its own share as ``<stem>.rank<r><suffix>``.

    Args:
        path: the CSV file to write (its folder is created).

    Examples:
        >>> writer = PredictionWriter("runs/predictions.csv")
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cmp", callbacks=[writer])  # doctest: +SKIP
        >>> trainer.predict(model, datamodule=datamodule)  # doctest: +SKIP
        >>> writer.rows  # doctest: +SKIP
        10000
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.rows = 0
        self._values: list[torch.Tensor] = []
        self._targets: list[torch.Tensor | None] = []

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = 0
        self._values, self._targets = [], []

    @override
    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not (trainer.is_global_zero or _data_shards(trainer) > 1):
            return
        if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0:
            raise TypeError(
                "PredictionWriter writes one CSV row per sample and needs predict_step to return a tensor whose "
                f"first dimension is the batch, got {type(outputs).__name__}; return e.g. self(x).argmax(1)"
            )
        values = outputs.detach().cpu().reshape(len(outputs), -1)
        target = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        if not (isinstance(target, torch.Tensor) and target.dim() == 1 and len(target) == len(values)):
            target = None
        self._values.append(values)
        self._targets.append(None if target is None else target.detach().cpu())

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._values:
            return
        path = self.path
        if _data_shards(trainer) > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        values = torch.cat(self._values)
        known = [t for t in self._targets if t is not None]
        _write_csv(path, values, torch.cat(known) if len(known) == len(self._targets) else None)
        self.rows = len(values)
        rank_zero_info(f"PredictionWriter: wrote {self.rows} predictions to {path}")


def _write_csv(path: Path, values: torch.Tensor, targets: torch.Tensor | None) -> None:
    width = values.shape[1]
    header = ["index", *(["prediction"] if width == 1 else [f"prediction_{i}" for i in range(width)])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header + (["target"] if targets is not None else []))
        for i, row in enumerate(values.tolist()):
            out.writerow([i, *row, *([int(targets[i])] if targets is not None else [])])


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"SamplesPerSecond needs a tensor or a tuple starting with one, got {type(first).__name__}")
    return int(first.shape[0])


def _data_shards(trainer: L.Trainer) -> int:
    """How many distinct batches one training step consumes: DDP-like strategies shard the data per rank."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    return int(kwargs.get("num_replicas", 1)) if isinstance(kwargs, dict) else 1
