"""The main job: ResNet-18 on Fashion-MNIST on CPU processes; prints test accuracy and samples/s.

Run ``python -m lightning_cmp.quickstart --help``. Lightning re-launches this module for ranks 1..N-1 with
the same arguments, so all work happens under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

import lightning_cmp  # registers the "cmp" and "mp" strategies
from lightning_cmp.callbacks import SamplesPerSecond
from lightning_cmp.data import FashionMNISTDataModule
from lightning_cmp.models import ImageClassifier

_PIPELINE_STRATEGIES = ("cmp", "mp", "gpipe", "spectrain", "pipedream", "async")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lightning_cmp.quickstart",
        description="Train a torchvision classifier on Fashion-MNIST (padded to 3x32x32) on CPU processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--strategy", default="cmp", help="cmp | mp | ddp | auto (any Lightning strategy name)")
    p.add_argument("--devices", type=int, default=2, help="CPU processes")
    p.add_argument("--num-stages", type=int, default=None, help="pipeline stages for cmp/mp (default: devices)")
    p.add_argument("--averaging", default="gradient", help="cmp only: gradient | parameter")
    p.add_argument(
        "--average-every", type=int, default=1, help="cmp with --averaging parameter: steps between averages"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="batch per step (per process for ddp)")
    p.add_argument("--limit-train", type=int, default=20000, help="first N training images (0: all 55000)")
    p.add_argument("--limit-eval", type=int, default=0, help="first N validation/test images (0: all)")
    p.add_argument(
        "--val-every",
        type=int,
        default=0,
        help="validate every N training steps, counted across epochs (0: each epoch)",
    )
    p.add_argument("--data-dir", default=None, help="directory with the *-ubyte.gz files (default: Debian's)")
    p.add_argument("--arch", default="resnet18", help="torchvision classifier")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 ResNet stem (16x the compute)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num_stages is not None and args.strategy not in _PIPELINE_STRATEGIES:
        p.error(f"--num-stages applies to --strategy {' or '.join(_PIPELINE_STRATEGIES)}, not {args.strategy!r}")
    if (args.averaging, args.average_every) != ("gradient", 1) and args.strategy != "cmp":
        p.error(f"--averaging/--average-every apply to --strategy cmp, not {args.strategy!r}")
    if args.val_every < 0:
        p.error(f"--val-every {args.val_every}: give a number of training steps, or 0 to validate after each epoch")
    return args


def make_strategy(
    name: str, num_stages: int | None, averaging: str = "gradient", average_every: int = 1
) -> str | Strategy:
    """A strategy name for the Trainer, or a ``CMPStrategy`` when a pipeline option differs from its default."""
    if num_stages is None and (averaging, average_every) == ("gradient", 1):
        return name
    return lightning_cmp.CMPStrategy(
        schedule=name, num_stages=num_stages, averaging=averaging, average_every=average_every
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    datamodule = FashionMNISTDataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        limit=args.limit_train or None,
        limit_eval=args.limit_eval or None,
        seed=args.seed,
    )
    model = ImageClassifier(args.arch, lr=args.lr, cifar_stem=args.cifar_stem)
    speed = SamplesPerSecond(warmup=5)
    curve = _ValidationCurve()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=make_strategy(args.strategy, args.num_stages, args.averaging, args.average_every),
        max_epochs=args.epochs,
        # an int interval counts training batches; without an epoch period it counts them across epochs
        **({"val_check_interval": args.val_every, "check_val_every_n_epoch": None} if args.val_every else {}),
        callbacks=[speed, curve],
        enable_progress_bar=True,
        enable_checkpointing=False,
        logger=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        print(f"strategy: {args.strategy}, devices: {args.devices}, arch: {args.arch}")
        print(f"threads per process: {torch.get_num_threads()}")
        print(f"test accuracy: {results[0]['test_acc']:.4f}")
        rate = speed.samples_per_second
        print(f"training throughput: {rate:.1f} samples/s" if rate else "training throughput: n/a (too few batches)")
        print(f"fit wall time: {fit_seconds:.1f} s")


class _ValidationCurve(L.Callback):
    """Prints the validation accuracy after every validation with the training step, the seconds since fit started
    and how many of them went to validation (rank 0): the points of an accuracy-vs-wall-time curve
    (`lightning_cmp.bench.accuracy` reads them)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.validating = 0.0  # seconds spent in finished validation loops (the sanity check included)
        self.val_start = 0.0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validating += time.perf_counter() - self.val_start

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val_acc")
        if trainer.sanity_checking or acc is None or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        elapsed, validating = now - self.start, self.validating + now - self.val_start
        print(
            f"val accuracy after step {trainer.global_step} (epoch {trainer.current_epoch + 1}): {float(acc):.4f} "
            f"at {elapsed:.1f} s ({validating:.1f} s validating)",
            flush=True,
        )


if __name__ == "__main__":
    main()
