"""One memory-benchmark training run: a large CNN built in ``configure_model``, trained by a Trainer in fresh workers.

``launch(config)`` starts ``python -m lightning_cmp.bench.memory_run '<json>'``; Lightning re-runs that command for
ranks 1..K-1, and every rank writes what its [`MemoryProbe`][lightning_cmp.bench.memory_probe.MemoryProbe] saw
to ``<out>/rank<r>.json``. A failed worker writes its error there too (an out-of-memory error under a cap).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_cmp
from lightning_cmp.bench.memory_probe import MemoryProbe, current_mib, process_summary
from lightning_cmp.bench.models import tiny

__all__ = ["ARCHS", "RUNS", "LargeModel", "Run", "cap_private_memory", "large_cnn", "launch"]

# VGG-style: 3x3 convolutions and 2x2 max-pools down to 2x2, then nine 3x3 convolutions of width 1024
# (36 MiB each): 313 MB (299 MiB) of float32 weights, spread evenly enough that 4 stages hold a quarter each.
_LARGE = (32, "M", 64, "M", 128, "M", 256, "M", *(1024,) * 9)


def large_cnn(num_classes: int = 10, widths: tuple[int | str, ...] = _LARGE) -> nn.Module:
    """The memory benchmark's CNN for 3x32x32 inputs: 313 MB of float32 weights.

    Examples:
        >>> with torch.device("meta"):
        ...     net = large_cnn()
        >>> round(sum(p.numel() for p in net.parameters()) * 4 / 2**20, 1)
        298.6
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in widths:
        if isinstance(item, str):
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


ARCHS = {"large": large_cnn, "tiny": tiny}


class LargeModel(L.LightningModule):
    """A classifier that builds its network in ``configure_model`` (``build_in="__init__"``: in ``__init__``).

    Examples:
        >>> model = LargeModel("tiny")
        >>> model.net is None
        True
        >>> model.configure_model(); model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, arch: str = "large", build_in: str = "configure_model", lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = ARCHS[arch]() if build_in == "__init__" else None

    def configure_model(self) -> None:
        if self.net is None:  # Lightning calls this hook on every fit/validate/test/predict
            self.net = ARCHS[self.hparams["arch"]]()

    def forward(self, x: Tensor) -> Tensor:
        if self.net is None:
            raise RuntimeError("LargeModel.net is built in configure_model(); call it before the forward")
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


@dataclass(frozen=True)
class Run:
    """One row of the memory benchmark: a Trainer strategy on a number of workers."""

    name: str
    strategy: str  # "auto" (single device), "ddp", or a lightning_cmp schedule: "mp", "gpipe", "cmp"
    workers: int
    label: str
    keep_split: bool = False
    build_in: str = "configure_model"
    env: tuple[tuple[str, str], ...] = ()  # set in every worker's environment


RUNS: dict[str, Run] = {
    r.name: r
    for r in (
        Run("single", "auto", 1, "single device"),
        Run("ddp-2", "ddp", 2, "ddp"),
        Run("ddp-4", "ddp", 4, "ddp"),
        Run("mp-2", "mp", 2, "mp"),
        Run("mp-4", "mp", 4, "mp"),
        Run("gpipe-2", "gpipe", 2, "gpipe"),
        Run("gpipe-4", "gpipe", 4, "gpipe"),
        Run("cmp-2", "cmp", 2, "cmp"),
        Run("cmp-4", "cmp", 4, "cmp"),
        Run("cmp-4-keep-split", "cmp", 4, "cmp, keep_split=True", keep_split=True),
        Run("cmp-4-init", "cmp", 4, "cmp, model built in __init__", build_in="__init__"),
        Run("cmp-4-gloo", "cmp", 4, "cmp, exchange through gloo", env=(("LIGHTNING_CMP_SHM", "0"),)),
    )
}


def _strategy(run: Run, config: dict[str, Any]) -> Any:
    if run.strategy == "auto":
        return "auto"
    if run.strategy == "ddp":  # a failed peer ends the run in 2 minutes, not torch's default 30
        return DDPStrategy(timeout=timedelta(seconds=120))
    cuts = config["cuts"][str(run.workers)]
    return lightning_cmp.CMPStrategy(schedule=run.strategy, partition=cuts, keep_split=run.keep_split)


def _loader(run: Run, config: dict[str, Any]) -> DataLoader:
    """``steps`` global batches of random images; DDP workers each take their share of every global batch."""
    n, size = config["steps"] * config["batch_size"], config["size"]
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    per_worker = config["batch_size"] // run.workers if run.strategy == "ddp" else config["batch_size"]
    return DataLoader(data, batch_size=per_worker)


def cap_private_memory(cap_mib: float) -> None:
    """Cap this process's private data (``RLIMIT_DATA``, what ``ulimit -d`` sets): an allocation past it fails.

    ``RLIMIT_DATA`` counts private writable mappings (the heap and every tensor), which is what training
    allocates; ``RLIMIT_AS`` would also count the several GiB of address space torch's libraries map. oneDNN is
    turned off so that every allocation goes through torch's allocator, whose error names the refused size (a
    convolution refused memory inside oneDNN fails with "could not create a primitive" instead).
    """
    now = current_mib("VmData")
    if now is not None and cap_mib <= now:
        raise ValueError(
            f"cap_mib={cap_mib:.0f} is below this process's private data after imports ({now:.0f} MiB): nothing "
            f"could run; use a cap above {now:.0f} MiB"
        )
    limit = int(cap_mib * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.backends.mkldnn.set_flags(False)


class _Record:
    """This worker's record, written to ``<out>/rank<r>.json`` at the end, or as soon as training fails (before
    Lightning's clean-up, which may kill this process when a peer is gone)."""

    def __init__(self, run: Run, out: Path) -> None:
        self.out = out
        self.probe = MemoryProbe(on_exception=self.fail)
        self.base_rss = current_mib("VmRSS")
        self.data: dict[str, Any] = {"run": run.name, "rank": int(os.environ.get("LOCAL_RANK", "0"))}
        self.data["base_vm_data_mib"] = current_mib("VmData")

    def fail(self, trainer: L.Trainer | None, err: BaseException) -> None:
        if "error" not in self.data:
            self.data["error"] = f"{type(err).__name__}: {err}".strip()
        if trainer is not None:
            self.data["rank"] = trainer.global_rank
        self.write()

    def write(self) -> None:
        self.data.update(points=self.probe.points, peak_activation_bytes=self.probe.activations.peak)
        self.data.update(process_summary(self.base_rss))
        (self.out / f"rank{self.data['rank']}.json").write_text(json.dumps(self.data, indent=1))


def train(config: dict[str, Any]) -> dict[str, Any]:
    """What one worker does: train ``steps`` steps, with a checkpoint at the last one unless ``checkpoint`` is
    false; writes its record and returns it."""
    run, out = RUNS[config["run"]], Path(config["out"])
    record = _Record(run, out)
    save = config.get("checkpoint", True)
    callbacks: list[L.Callback] = [record.probe]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=config["steps"]))
    try:
        trainer = L.Trainer(
            accelerator="cpu", devices=run.workers, strategy=_strategy(run, config), max_steps=config["steps"],
            logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=callbacks, enable_checkpointing=save,
        )  # fmt: skip
        L.seed_everything(0, verbose=False)
        trainer.fit(LargeModel(config["arch"], run.build_in), _loader(run, config))
        record.data["rank"] = trainer.global_rank
        record.probe.record("after fit", trainer)
        record.data["checkpoint_file_bytes"] = sum(p.stat().st_size for p in (out / "ckpt").glob("*.ckpt"))
    except BaseException as err:  # reported to the parent: an out-of-memory error is a result here
        record.fail(None, err)
    record.probe.rss.stop()
    record.write()
    return record.data


def main(argv: list[str] | None = None) -> None:
    config = json.loads((argv if argv is not None else sys.argv[1:])[0])
    if config.get("cap_mib"):
        cap_private_memory(config["cap_mib"])
    torch.set_num_threads(1)
    if "error" in train(config):  # leave at once: a peer may be blocked in a collective with this worker
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def launch(config: dict[str, Any], timeout: float = 900, grace: float = 60) -> dict[str, Any]:
    """Run ``config["run"]`` in fresh processes; returns ``{"ranks": [record or None], "error"?, "wall_s"}``.

    The workers run in their own session, killed as a group after ``timeout`` seconds, or ``grace`` seconds
    after rank 0 exits if some rank has not reported by then (a peer left blocked by a failed worker).
    """
    run, out = RUNS[config["run"]], Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lightning_cmp.bench.memory_run", json.dumps(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(run.env)}
    started = time.monotonic()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = _wait(proc, out, run.workers, started + timeout, grace)
    _kill_group(proc.pid)
    ranks = [_read(out / f"rank{r}.json") for r in range(run.workers)]
    result: dict[str, Any] = {"ranks": ranks, "wall_s": round(time.monotonic() - started, 1)}
    error = _first_error(ranks, timed_out, timeout, proc.returncode, out / "log.txt")
    if error:
        result["error"] = error
    return result


def _wait(proc: subprocess.Popen[bytes], out: Path, workers: int, deadline: float, grace: float) -> bool:
    """Wait for rank 0 and then for every rank's record; True when the deadline passed first."""
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)
    until = min(deadline, time.monotonic() + grace)
    while time.monotonic() < until and not all((out / f"rank{r}.json").exists() for r in range(workers)):
        time.sleep(0.5)
    return False


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already
        os.killpg(pid, signal.SIGKILL)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record


def _first_error(
    ranks: list[dict[str, Any] | None], timed_out: bool, timeout: float, returncode: int | None, log: Path
) -> str | None:
    for rank, record in enumerate(ranks):
        if record is not None and "error" in record:
            return f"rank {rank}: {record['error']}"
    if timed_out:
        return f"timed out after {timeout:.0f} s; raise --timeout if the machine is slow"
    missing = [r for r, record in enumerate(ranks) if record is None]
    if returncode or missing:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        return f"exit code {returncode}, no record from rank(s) {missing}: {tail[-300:]}"
    return None


if __name__ == "__main__":
    main()
