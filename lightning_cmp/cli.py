"""The ``lightning-cmp`` command: a LightningCLI with the project's models, datamodules and strategies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_cmp  # noqa: F401  (registers the strategies "cmp", "mp" and "gpipe" for --trainer.strategy=cmp)
from lightning_cmp.callbacks import PredictionWriter
from lightning_cmp.data import FashionMNISTDataModule
from lightning_cmp.errors import CMPConfigError, PartitionError
from lightning_cmp.models import ImageClassifier

# The short names --data=CIFAR10DataModule / --data=CIFAR100DataModule resolve because lightning_cmp.data is
# imported (jsonargparse finds imported subclasses of LightningDataModule by class name).

__all__ = ["CMPCLI", "SEED", "TRAINER_DEFAULTS", "main", "make_cli", "parse_config"]

#: What a bare ``lightning-cmp fit`` runs on (recipes and command-line flags override each entry):
#: ``strategy="cmp"`` on 2 CPU processes for 1 epoch. Pass ``--trainer.accelerator=gpu`` for GPUs.
TRAINER_DEFAULTS: dict[str, Any] = {"accelerator": "cpu", "devices": 2, "strategy": "cmp", "max_epochs": 1}

#: Default of ``--seed_everything``: every run is reproducible unless a seed is given.
SEED = 0


class CMPCLI(LightningCLI):
    """LightningCLI whose defaults are ``ImageClassifier`` on ``FashionMNISTDataModule`` with ``strategy="cmp"``.

    Model and data are subclass choices, so ``--model=my_package.MyModule`` or ``--data=CIFAR10DataModule``
    swap them. The strategy takes a registered name (``--trainer.strategy=mp``) with its defaults, or the
    class with options (``--trainer.strategy=CMPStrategy --trainer.strategy.init_args.num_stages=2``); a name
    cannot take ``init_args``. ``predict`` writes what ``predict_step`` returns to a CSV file
    (``--predictions=PATH``, default ``<trainer.default_root_dir>/predictions.csv``).

    Examples:
        >>> cli = CMPCLI(args=["--trainer.max_steps=1"], run=False)  # doctest: +SKIP
        >>> type(cli.model).__name__, cli.trainer.strategy.schedule  # doctest: +SKIP
        ('ImageClassifier', 'cmp')
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__name__}"},
                "data": {"class_path": f"{FashionMNISTDataModule.__module__}.{FashionMNISTDataModule.__name__}"},
            }
        )
        parser.add_argument(
            "--predictions",
            type=str | None,
            default=None,
            help="predict only: CSV file for the predictions (default: <trainer.default_root_dir>/predictions.csv)",
        )

    @override
    def before_instantiate_classes(self) -> None:
        if self.subcommand not in (None, "predict") and self.config[self.subcommand].get("predictions"):
            self.parser.error(f"--predictions applies to `lightning-cmp predict`, not to {self.subcommand!r}")

    @override
    def instantiate_classes(self) -> None:
        """A strategy option our classes refuse is a parser error naming the option, not a traceback."""
        try:
            super().instantiate_classes()
        except (CMPConfigError, PartitionError, ValueError) as err:
            ours = _refusal(err)
            if ours is None:
                raise
            self.parser.error(f"--trainer.strategy: {ours}")

    def before_predict(self) -> None:
        """Add a ``PredictionWriter``: ``trainer.predict`` returns the predictions, which a command would drop."""
        path = self.config["predict"].get("predictions") or Path(self.trainer.default_root_dir) / "predictions.csv"
        # Trainer.callbacks is set in Trainer.__init__, not declared on the class
        callbacks: list[L.Callback] = self.trainer.callbacks  # type: ignore[attr-defined]
        callbacks.append(PredictionWriter(path))


def _refusal(err: BaseException) -> str | None:
    """What lightning_cmp said about a bad option: its own error, or the reason jsonargparse quotes from it.

    Examples:
        >>> _refusal(CMPConfigError("unknown averaging 'x'"))
        "unknown averaging 'x'"
        >>> text = "Does not validate\\nErrors:\\n  - Expected a <class 'str'>\\n  - unknown averaging 'x'"
        >>> print(_refusal(ValueError(text)))
        unknown averaging 'x'
        >>> _refusal(ValueError("something else")) is None
        True
    """
    if isinstance(err, CMPConfigError | PartitionError):
        return str(err)
    reasons = [line.strip()[2:] for line in str(err).splitlines() if line.startswith("  - ")]
    reasons = [r for r in reasons if not r.startswith("Expected a ")]
    return "; ".join(reasons) if reasons and "Errors:" in str(err) else None


def make_cli(
    args: Sequence[str] | None = None, run: bool = True, cli_class: type[CMPCLI] = CMPCLI, **kwargs: Any
) -> CMPCLI:
    """Build the CLI (``run=False``: parse and instantiate only, as the tests do).

    Examples:
        >>> cli = make_cli(["--data.limit=64", "--trainer.max_steps=1"], run=False)  # doctest: +SKIP
    """
    kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
    kwargs.setdefault("seed_everything_default", SEED)
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


class _ParseOnly(CMPCLI):
    @override
    def instantiate_classes(self) -> None:
        pass


def parse_config(args: Sequence[str]) -> Namespace:
    """Parse a command line (without the subcommand) into the full config; instantiates nothing.

    Examples:
        >>> config = parse_config(["--config=recipes/resnet18_fashion_mnist_cmp.yaml"])  # doctest: +SKIP
        >>> config.trainer.strategy.init_args.num_stages  # doctest: +SKIP
        2
    """
    return make_cli(args, run=False, cli_class=_ParseOnly).config


def main() -> None:
    """Entry point of the ``lightning-cmp`` console script: ``lightning-cmp fit --config recipes/<name>.yaml``."""
    make_cli()


if __name__ == "__main__":
    main()
