"""Every recipe parses and runs a couple of steps; the ``lightning-cmp`` command runs as the recipes say.

The slow tests run documented command lines as a user would (``run_command``), from a working directory
holding ``recipes/`` and fake CIFAR folders, with ``TINY_RUN`` appended.
"""

from __future__ import annotations

import atexit
import csv
import functools
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator

import lightning_cmp
from lightning_cmp.cli import SEED, make_cli, parse_config
from lightning_cmp.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule
from lightning_cmp.data.cifar import _CIFARDataModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter:UserWarning")

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ["--data.limit=8", "--data.limit_eval=4", "--data.batch_size=2", "--data.val_size=8"]
ONE_DEVICE = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"]
#: appended to every command line the slow tests run: 2 training steps, 2 batches of 16 to evaluate or predict
TINY_RUN = [
    *("--data.limit=32", "--data.limit_eval=32", "--data.batch_size=16", "--data.val_size=16"),
    *("--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"),
    *("--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2", "--trainer.enable_progress_bar=false"),
]


def write_fake_cifar(data_dir: Path, datamodule: type[_CIFARDataModule] = CIFAR10DataModule, per_file: int = 8) -> None:
    """A CIFAR folder in torchvision's pickle layout with ``per_file`` random images per batch file."""
    root = data_dir / datamodule.folder
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*datamodule.train_files, *datamodule.test_files]:
        images = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        entry = {"data": images, datamodule.label_key: [i % 10 for i in range(per_file)]}
        (root / name).write_bytes(pickle.dumps(entry))


def write_fake_cifar10(data_dir: Path, per_file: int = 8) -> None:
    write_fake_cifar(data_dir, CIFAR10DataModule, per_file)


def header_commands(recipe: Path) -> list[str]:
    """The command lines in a recipe's header comment (``\\`` continuations joined)."""
    header = recipe.read_text().split("\nseed_everything")[0]
    text = "\n".join(line.lstrip("#").strip() for line in header.splitlines()).replace("\\\n", " ")
    return [" ".join(line.split("#")[0].split()) for line in text.splitlines() if line.startswith("lightning-cmp ")]


@functools.cache
def workdir() -> Path:
    """Where commands run, as from the repository root: ``recipes/`` and fake CIFAR-10/100 folders in ``data/``.

    One per test session, shared by this module and ``tests/test_docs.py``; removed at exit.
    """
    path = Path(tempfile.mkdtemp(prefix="lightning-cmp-commands-"))
    atexit.register(shutil.rmtree, path, True)
    (path / "recipes").symlink_to(ROOT / "recipes")
    write_fake_cifar(path / "data", CIFAR10DataModule, per_file=16)
    write_fake_cifar(path / "data", CIFAR100DataModule, per_file=80)
    return path


_RUNS: dict[str, subprocess.CompletedProcess[str]] = {}
_TINY_KEYS = {option.split("=")[0] for option in TINY_RUN}


def run_command(command: str) -> subprocess.CompletedProcess[str]:
    """Run a ``lightning-cmp ...`` command line in ``workdir()`` with ``TINY_RUN`` appended; it must succeed.

    Each command runs once per session: the docs tests and these share the runs of the commands both have, and
    commands that differ only in options ``TINY_RUN`` overrides (``--data.limit=512``) run the same job.
    """
    args = shlex.split(command)
    key = " ".join(a for a in args if a.split("=")[0] not in _TINY_KEYS)
    if key not in _RUNS:
        if args[0] == "lightning-cmp":
            script = Path(sys.executable).with_name("lightning-cmp")
            args[:1] = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_cmp.cli"]
        done = subprocess.run([*args, *TINY_RUN], cwd=workdir(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        _RUNS[key] = done
    return _RUNS[key]


def test_every_recipe_has_a_header_with_the_commands() -> None:
    assert len(RECIPES) >= 5
    for recipe in RECIPES:
        assert recipe.read_text().startswith("# "), f"{recipe.name}: start with a comment saying what it reproduces"
        commands = header_commands(recipe)
        assert f"lightning-cmp fit --config recipes/{recipe.name}" in commands, f"{recipe.name}: give the command"
        root = yaml.safe_load(recipe.read_text())["trainer"]["default_root_dir"]
        test = f"lightning-cmp test --config recipes/{recipe.name} --ckpt_path {root}/checkpoints/last.ckpt"
        assert test in commands, f"{recipe.name}: give the test command with the checkpoint the fit writes"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses_as_written(recipe: Path) -> None:
    config = parse_config([f"--config={recipe}"])  # GPU recipes too: nothing is instantiated
    strategy = config.trainer.strategy
    if not isinstance(strategy, str):
        assert strategy.class_path == "lightning_cmp.CMPStrategy"
        lightning_cmp.CMPStrategy(**vars(strategy.init_args))  # the options are valid
    assert config.model.class_path == "lightning_cmp.models.ImageClassifier"
    callbacks = [c.class_path for c in config.trainer.callbacks]
    assert "lightning_cmp.callbacks.SamplesPerSecond" in callbacks, f"{recipe.name}: report samples/s"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_two_steps(recipe: Path, tmp_path: Path) -> None:
    args = [f"--config={recipe}", *TINY, *ONE_DEVICE, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0"]
    if "cifar" in recipe.name:
        # CIFAR is absent offline: run on a fake folder in torchvision's layout (the real data is not needed here).
        write_fake_cifar(tmp_path / "data")
        args += [f"--data.data_dir={tmp_path / 'data'}", "--data.download=false"]
    cli = make_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])


def test_command_line_overrides_the_strategy() -> None:
    recipe = next(r for r in RECIPES if r.name == "resnet18_fashion_mnist_cmp.yaml")
    assert parse_config([f"--config={recipe}"]).trainer.strategy.init_args.num_stages == 2
    overrides = ["--trainer.devices=3", "--trainer.strategy.init_args.num_stages=3"]
    overrides += ["--trainer.strategy.init_args.partition=uniform"]
    cli = make_cli([f"--config={recipe}", *overrides], run=False)
    assert isinstance(cli.trainer.strategy, lightning_cmp.CMPStrategy)
    assert (cli.trainer.strategy.num_stages, cli.trainer.strategy.partition) == (3, "uniform")
    for partition, expected in (("bipartition", "bipartition"), ("{forward: [6], backward: [5]}", None)):
        cli = make_cli([f"--config={recipe}", f"--trainer.strategy.init_args.partition={partition}"], run=False)
        got = cli.trainer.strategy.partition  # type: ignore[attr-defined]
        assert got == (expected or {"forward": [6], "backward": [5]}), got
    by_name = make_cli(["--trainer.strategy=mp", "--trainer.devices=2", "--trainer.accelerator=cpu"], run=False)
    assert isinstance(by_name.trainer.strategy, lightning_cmp.CMPStrategy) and by_name.trainer.strategy.schedule == "mp"
    by_class = make_cli(["--trainer.strategy=CMPStrategy", "--trainer.strategy.init_args.num_stages=2"], run=False)
    assert by_class.trainer.strategy.num_stages == 2  # type: ignore[attr-defined]
    assert isinstance(by_class.datamodule, FashionMNISTDataModule)


def test_a_registered_name_takes_no_options(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/recipes.md says so and points to the class: pin it, so the page changes when jsonargparse does."""
    with pytest.raises(SystemExit):
        parse_config(["--trainer.strategy=cmp", "--trainer.strategy.init_args.num_stages=4"])
    assert 'Parser key "trainer.strategy"' in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("averaging=bogus", "--trainer.strategy: unknown averaging 'bogus'; valid: 'gradient', 'parameter', 'sharded'"),
        ("num_stages=3", "--trainer.strategy: num_stages=3"),
    ],
)
def test_a_bad_strategy_option_is_a_parser_error(option: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        make_cli(["--trainer.strategy=CMPStrategy", f"--trainer.strategy.init_args.{option}"], run=False)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and says in err and "Traceback" not in err, err


def test_bare_command_runs_cmp_on_two_cpu_processes_for_one_epoch() -> None:
    cli = make_cli([], run=False)
    assert isinstance(cli.trainer.strategy, lightning_cmp.CMPStrategy) and cli.trainer.strategy.schedule == "cmp"
    assert (cli.trainer.num_devices, cli.trainer.max_epochs, cli.config.seed_everything) == (2, 1, SEED)
    assert isinstance(cli.trainer.accelerator, CPUAccelerator)


def test_predictions_flag_is_for_predict_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        make_cli(["fit", "--predictions=out.csv"])
    assert "--predictions applies to `lightning-cmp predict`" in capsys.readouterr().err


def test_cifar_missing_offline_names_the_folder(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        dm.prepare_data()


def _two_workers(done: subprocess.CompletedProcess[str]) -> bool:
    return "MEMBER: 2/2" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18_fashion_mnist_mp", "vgg16_cifar10_cmp"])
def test_pipeline_recipe_fits_in_two_processes_under_its_own_strategy(name: str) -> None:
    fit = header_commands(ROOT / "recipes" / f"{name}.yaml")[0]
    assert fit.startswith("lightning-cmp fit") and "--trainer" not in fit  # the recipe's own strategy and devices
    done = run_command(fit)
    assert _two_workers(done) and "`max_steps=2` reached" in done.stdout + done.stderr
    assert (workdir() / "runs" / name / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_cmp_recipe_fit_then_test_validate_predict_from_its_checkpoint() -> None:
    recipe = ROOT / "recipes" / "resnet18_fashion_mnist_cmp.yaml"
    fit, test = header_commands(recipe)
    checkpoint = "runs/resnet18_fashion_mnist_cmp/checkpoints/last.ckpt"
    assert test.endswith(f"--ckpt_path {checkpoint}")
    fitted = run_command(fit)
    assert _two_workers(fitted) and "SamplesPerSecond:" in fitted.stdout + fitted.stderr
    assert "test_acc" in run_command(test).stdout
    validated = run_command(test.replace("lightning-cmp test", "lightning-cmp validate"))
    assert "val_acc" in validated.stdout
    predict = test.replace("lightning-cmp test", "lightning-cmp predict") + " --predictions predictions.csv"
    predicted = run_command(predict)  # the command of docs/recipes.md
    written = workdir() / "predictions.csv"
    assert "wrote 32 predictions to predictions.csv" in predicted.stdout + predicted.stderr
    with written.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32 and set(rows[0]) == {"index", "prediction", "target"}
    assert {int(r["prediction"]) for r in rows} <= set(range(10))


def test_recipe_headers_name_only_real_flags() -> None:
    """Every flag in a header command parses (a renamed option would leave a command that fails)."""
    for recipe in RECIPES:
        for command in header_commands(recipe):
            args = [a for a in shlex.split(command)[2:] if not a.startswith("--ckpt_path")]
            args = [a for a in args if not re.fullmatch(r"runs/\S+\.ckpt", a)]
            parse_config(args)
