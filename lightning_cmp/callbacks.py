"""Callbacks for measuring training runs: SamplesPerSecond (median training throughput)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["SamplesPerSecond"]


class SamplesPerSecond(L.Callback):
    """Median training throughput (samples/s over all ranks) after a warm-up, measured on rank 0.

    Times each training batch from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
    communication and optimizer step) and counts ``local batch size x data shards``, where the number of
    data shards is the strategy's ``distributed_sampler_kwargs["num_replicas"]`` (1 when it has none).

    Args:
        warmup: training batches to skip before recording (allocator, thread pools, first communication).

    Example:
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


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"SamplesPerSecond needs a tensor or a tuple starting with one, got {type(first).__name__}")
    return int(first.shape[0])


def _data_shards(trainer: L.Trainer) -> int:
    """How many distinct batches one training step consumes: DDP-like strategies shard the data per rank."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    return int(kwargs.get("num_replicas", 1)) if isinstance(kwargs, dict) else 1
