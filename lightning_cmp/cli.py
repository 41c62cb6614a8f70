"""The ``lightning-cmp`` command: a LightningCLI with the project's models, datamodules and strategies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_cmp  # noqa: F401  (registers the strategies "cmp" and "mp" for --trainer.strategy=cmp)
from lightning_cmp.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule
from lightning_cmp.models import ImageClassifier

__all__ = ["CMPCLI", "DATAMODULES", "main", "make_cli", "parse_config"]

#: DataModules the CLI knows by short name (``--data=CIFAR10DataModule``); any importable class path works too.
DATAMODULES = (FashionMNISTDataModule, CIFAR10DataModule, CIFAR100DataModule)


class CMPCLI(LightningCLI):
    """LightningCLI whose defaults are ``ImageClassifier`` on ``FashionMNISTDataModule``.

    Model and data are subclass choices, so ``--model=my_package.MyModule`` or ``--data=CIFAR10DataModule``
    swap them; the strategy takes a name (``--trainer.strategy=cmp``) or a class with options
    (``--trainer.strategy=lightning_cmp.CMPStrategy --trainer.strategy.init_args.num_stages=2``).

    Example:
        >>> cli = CMPCLI(args=["--trainer.max_steps=1"], run=False)  # doctest: +SKIP
        >>> type(cli.model).__name__  # doctest: +SKIP
        'ImageClassifier'
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__name__}"},
                "data": {"class_path": f"{FashionMNISTDataModule.__module__}.{FashionMNISTDataModule.__name__}"},
            }
        )


def make_cli(
    args: Sequence[str] | None = None, run: bool = True, cli_class: type[CMPCLI] = CMPCLI, **kwargs: Any
) -> CMPCLI:
    """Build the CLI (``run=False``: parse and instantiate only, as the tests do).

    Example:
        >>> cli = make_cli(["--data.limit=64", "--trainer.max_steps=1"], run=False)  # doctest: +SKIP
    """
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

    Example:
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
