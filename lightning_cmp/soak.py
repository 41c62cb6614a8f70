"""Soak run: many steps of a small model; prints each worker's memory and step time to show neither grows.

Run ``python -m lightning_cmp.soak --steps 1000 --devices 2`` (or 3). Lightning re-launches this module for
ranks 1..N-1 with the same arguments. Every ``--every`` steps each worker samples its resident memory (RSS)
and the mean step time since the last sample; rank 0 prints the table and the growth after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_cmp


class _Random(Dataset[tuple[Tensor, Tensor]]):
    """Endless-looking random data made on the fly (no dataset memory to confuse the RSS figures)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(index)
        return torch.randn(256, generator=g), torch.randint(0, 10, (), generator=g)


class _SmallMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(6):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(256, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:  # Linux; psutil is not a dependency
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class SoakMonitor(L.Callback):
    """Every ``every`` steps: (step, RSS in MiB, mean step seconds since the previous sample)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[tuple[int, float, float]] = []
        self._since = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            now = time.perf_counter()
            self.samples.append((step, _rss_mib(), (now - self._since) / self.every))
            self._since = now


def report(per_rank: list[list[tuple[int, float, float]]], warmup: int) -> dict[str, Any]:
    """Growth of RSS and step time from the first sample after ``warmup`` steps to the last, per rank."""
    result: dict[str, Any] = {"ranks": []}
    for rank, samples in enumerate(per_rank):
        after = [s for s in samples if s[0] >= warmup] or samples
        first, last = after[0], after[-1]
        times = [s[2] for s in after]
        half = max(1, len(times) // 2)
        result["ranks"].append(
            {
                "rank": rank,
                "rss_mib_after_warmup": round(first[1], 1),
                "rss_mib_end": round(last[1], 1),
                "rss_growth_mib": round(last[1] - first[1], 1),
                "step_ms_first_half": round(1000 * sum(times[:half]) / half, 2),
                "step_ms_second_half": round(1000 * sum(times[half:]) / max(1, len(times) - half), 2),
            }
        )
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.soak", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--averaging", default="gradient", help="gradient | parameter")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--every", type=int, default=100, help="steps between samples")
    p.add_argument("--warmup", type=int, default=200, help="steps before the growth is measured")
    p.add_argument("--json", default=None, help="also write the figures to this file (rank 0)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(0, verbose=False)
    monitor = SoakMonitor(args.every)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=lightning_cmp.CMPStrategy(averaging=args.averaging),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    data = DataLoader(_Random(args.steps * args.batch_size), batch_size=args.batch_size)
    trainer.fit(_SmallMLP(), data)
    per_rank: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(per_rank, monitor.samples)
    if trainer.global_rank != 0:
        return
    print(f"soak: {args.steps} steps, devices={args.devices}, averaging={args.averaging}")
    print("step  " + "  ".join(f"rank{r} RSS MiB  ms/step" for r in range(len(per_rank))))
    for row in zip(*per_rank, strict=True):
        cells = "  ".join(f"{rss:13.1f}  {1000 * t:7.2f}" for _, rss, t in row)
        print(f"{row[0][0]:>4}  {cells}")
    summary = report(per_rank, args.warmup)
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples": per_rank, **summary}, f)


if __name__ == "__main__":
    main()
