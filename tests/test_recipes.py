"""Every recipe parses with the ``lightning-cmp`` parser and runs a couple of steps on small data."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_cmp
from lightning_cmp.cli import make_cli, parse_config
from lightning_cmp.data import CIFAR10DataModule, FashionMNISTDataModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter:UserWarning")

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ["--data.limit=8", "--data.limit_eval=4", "--data.batch_size=2", "--data.val_size=8"]
ONE_DEVICE = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"]


def write_fake_cifar10(data_dir: Path, per_file: int = 8) -> None:
    """A CIFAR-10 folder in torchvision's pickle layout with ``per_file`` random images per batch file."""
    root = data_dir / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*CIFAR10DataModule.train_files, *CIFAR10DataModule.test_files]:
        images = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        entry = {"data": images, "labels": [i % 10 for i in range(per_file)]}
        (root / name).write_bytes(pickle.dumps(entry))


def test_every_recipe_has_a_header_with_the_command() -> None:
    assert len(RECIPES) >= 5
    for recipe in RECIPES:
        header = recipe.read_text().split("\nseed_everything")[0]
        assert header.startswith("# "), f"{recipe.name}: start with a comment saying what it reproduces"
        assert f"lightning-cmp fit --config recipes/{recipe.name}" in header, f"{recipe.name}: give the command"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses_as_written(recipe: Path) -> None:
    config = parse_config([f"--config={recipe}"])  # GPU recipes too: nothing is instantiated
    strategy = config.trainer.strategy
    if not isinstance(strategy, str):
        assert strategy.class_path == "lightning_cmp.CMPStrategy"
        lightning_cmp.CMPStrategy(**vars(strategy.init_args))  # the options are valid
    assert config.model.class_path == "lightning_cmp.models.ImageClassifier"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_two_steps(recipe: Path, tmp_path: Path) -> None:
    args = [f"--config={recipe}", *TINY, *ONE_DEVICE, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0"]
    if "cifar" in recipe.name:
        # CIFAR is absent offline: run on a fake folder in torchvision's layout (the real data is not needed here).
        write_fake_cifar10(tmp_path / "data")
        args += [f"--data.data_dir={tmp_path / 'data'}", "--data.download=false"]
    cli = make_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])


def test_command_line_overrides_the_strategy() -> None:
    recipe = next(r for r in RECIPES if r.name == "resnet18_fashion_mnist_cmp.yaml")
    overrides = ["--trainer.strategy.init_args.num_stages=2", "--trainer.strategy.init_args.partition=uniform"]
    cli = make_cli([f"--config={recipe}", *overrides], run=False)
    assert isinstance(cli.trainer.strategy, lightning_cmp.CMPStrategy)
    assert (cli.trainer.strategy.num_stages, cli.trainer.strategy.partition) == (2, "uniform")
    by_name = make_cli(["--trainer.strategy=mp", "--trainer.devices=2", "--trainer.accelerator=cpu"], run=False)
    assert isinstance(by_name.trainer.strategy, lightning_cmp.CMPStrategy) and by_name.trainer.strategy.schedule == "mp"
    by_class = make_cli(
        [
            "--trainer.strategy=lightning_cmp.CMPStrategy",
            "--trainer.strategy.init_args.num_stages=2",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
        ],
        run=False,
    )
    assert by_class.trainer.strategy.num_stages == 2  # type: ignore[attr-defined]
    assert isinstance(by_class.datamodule, FashionMNISTDataModule)


def test_cifar_missing_offline_names_the_folder(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        dm.prepare_data()


@pytest.mark.slow
def test_cmp_recipe_fits_and_tests_from_its_checkpoint_in_two_processes(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("lightning-cmp")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_cmp.cli"]
    recipe = "--config=recipes/resnet18_fashion_mnist_cmp.yaml"
    small = ["--data.limit=64", "--data.batch_size=32", "--data.limit_eval=32", "--trainer.max_steps=2"]
    small += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("fit", recipe, *small, "--trainer.limit_val_batches=0")
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file(), sorted(str(p) for p in tmp_path.rglob("*"))
    tested = run("test", recipe, *small, f"--ckpt_path={checkpoint}", "--trainer.limit_test_batches=1")
    assert "test_acc" in tested.stdout
