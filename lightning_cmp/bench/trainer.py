"""``python -m lightning_cmp.bench.trainer``: the benchmarks' Trainer-level timing harness.

Each run is one fresh ``python -m lightning_cmp.bench.trainer --run '<json>'`` (Lightning re-runs that command for
the other ranks) that fits `lightning_cmp.bench.models.build`'s model through ``L.Trainer`` on random data, with
the same global batch for every method. Rank 0 times every step (``on_train_batch_start`` to the next one) and
splits it into four parts, measured on its own clock:

* ``training_step``: the LightningModule's ``training_step``, start to return: the forward and the loss. Under
  `CMPStrategy` that is the pipeline's whole forward phase (every stage, the activations' sends and receives, and
  with ``averaging="sharded"`` the waits for the previous step's weight gathers).
* ``backward``: ``on_before_backward`` to ``on_after_backward``: ``loss.backward()``. Under `CMPStrategy` the
  pipeline's whole backward phase runs in it: every stage's backward, the gradients' sends and receives, and the
  copies' gradient averaging, started per stage and waited for at the end (``WAIT_AVERAGE``; the sharded form's
  reduce-scatters); under ``ddp`` the bucketed all-reduce and DDP's wait for it.
* ``optimizer``: ``on_before_optimizer_step`` to the return of the LightningModule's ``optimizer_step``: the
  optimizer's update and what the strategy does after it (`CMPStrategy`: starting the sharded form's gathers,
  and every 50th step the copies' check, a collective).
* ``other``: the step less the three: the data loader, moving the batch, ``zero_grad``, Lightning's hooks and
  bookkeeping, ``ddp``'s work around the module's forward (buffer broadcast, the reducer's set-up) and, with
  several `CMPStrategy` pipelines, the averaging of the gradients of parameters outside the split module.

Methods (`METHODS`): ``single``, ``single_2threads``, ``ddp``, ``mp``, ``cmp``, ``cmp_gloo`` and the scale-out
benchmark's ``ddp2``, ``sharded_dp2``, ``ddp4``, ``cmp2x2``, ``cmp2x2_sharded``; every worker runs 1 thread
(``single_2threads``: 2). The first 2 steps (building the pipeline or DDP's buckets, the optimizer state) are
left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "OPTIONS", "PARTS", "TrainerMethod", "run_trainer", "summarize_trainer"]

#: the parts each step is split into (see the module docstring for what each contains)
PARTS = ("training_step", "backward", "optimizer", "other")
#: ``run_trainer``'s options and their defaults; ``bucket_cap_mb``: the ``ddp`` methods' DDP buckets
OPTIONS: dict[str, Any] = {"bucket_cap_mb": 25.0}
_WARMUP = 2  # steps left out: the first builds the pipeline or DDP's buckets, the second the optimizer state
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TrainerMethod:
    """One way to train through the Trainer.

    ``strategy``: ``"auto"`` (one device), ``"ddp"`` (Lightning's ``DDPStrategy`` with
    ``gradient_as_bucket_view``), ``"sharded_dp"`` (the registered name) or ``"cmp"`` (``CMPStrategy(**options)``).
    ``data_parallel``: the ways the global batch is split; each worker's loader gets ``batch_size // data_parallel``
    rows (``ddp``: one share per worker; one pipeline: the whole batch on every worker). ``env``: set in every
    worker's environment.

    Examples:
        >>> METHODS["ddp"].per_loader(64), METHODS["mp"].per_loader(64), METHODS["cmp2x2"].per_loader(64)
        (32, 64, 32)
    """

    name: str
    workers: int
    label: str
    strategy: str
    options: tuple[tuple[str, Any], ...] = ()
    data_parallel: int = 1
    threads: int = 1
    env: tuple[tuple[str, str], ...] = ()

    def per_loader(self, batch_size: int) -> int:
        """Rows in each worker's loader for a global batch of ``batch_size``."""
        if batch_size % self.data_parallel:
            raise ValueError(
                f"batch_size={batch_size} does not split over {self.name}'s {self.data_parallel} data-parallel "
                f"loaders; use a multiple of {self.data_parallel}"
            )
        return batch_size // self.data_parallel


_DDP = "Lightning ddp, {} workers (gradient_as_bucket_view)"
METHODS: dict[str, TrainerMethod] = {
    m.name: m
    for m in (
        TrainerMethod("single", 1, "single process, 1 thread", "auto"),
        TrainerMethod("single_2threads", 1, "single process, 2 threads", "auto", threads=2),
        TrainerMethod("ddp", 2, _DDP.format(2), "ddp", data_parallel=2),
        TrainerMethod("mp", 2, 'CMPStrategy(schedule="mp"), 2 workers', "cmp", (("schedule", "mp"),)),
        TrainerMethod("cmp", 2, "CMPStrategy(), 2 workers", "cmp"),
        TrainerMethod(
            "cmp_gloo",
            2,
            "CMPStrategy(), 2 workers, mirror exchange through gloo (LIGHTNING_CMP_SHM=0)",
            "cmp",
            env=(("LIGHTNING_CMP_SHM", "0"),),
        ),
        TrainerMethod("ddp2", 2, _DDP.format(2), "ddp", data_parallel=2),
        TrainerMethod("sharded_dp2", 2, 'strategy="sharded_dp", 2 workers', "sharded_dp", data_parallel=2),
        TrainerMethod("ddp4", 4, _DDP.format(4), "ddp", data_parallel=4),
        TrainerMethod(
            "cmp2x2", 4, "CMPStrategy(num_stages=2), 4 workers (D=2)", "cmp", (("num_stages", 2),), data_parallel=2
        ),
        TrainerMethod(
            "cmp2x2_sharded",
            4,
            'CMPStrategy(num_stages=2, averaging="sharded"), 4 workers',
            "cmp",
            (("num_stages", 2), ("averaging", "sharded")),
            data_parallel=2,
        ),
    )
}


def _method(name: str) -> TrainerMethod:
    if name not in METHODS:
        raise ValueError(f"unknown Trainer method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def _options(given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; run_trainer takes {', '.join(OPTIONS)}")
    return {**OPTIONS, **given}


# -- the driver: one fresh run ------------------------------------------------------------------------------------
def run_trainer(
    method: str, model: str, batch_size: int, size: int, steps: int, timeout: float = 600, **options: Any
) -> dict[str, Any]:
    """Per-step seconds and their parts of one Trainer run of ``method`` in fresh processes, warm-up left out.

    ``batch_size`` is the global batch (split as `TrainerMethod.per_loader` says); ``size`` the images' side;
    ``steps`` the steps timed (2 more run first). ``options``: see `OPTIONS`. The processes are killed, and a
    ``TimeoutError`` raised, if the run takes more than ``timeout`` seconds.

    Examples:
        >>> run = run_trainer("cmp", "tiny", batch_size=16, size=16, steps=2)  # doctest: +SKIP
        >>> len(run["step_s"]), sorted(run["parts"])  # doctest: +SKIP
        (2, ['backward', 'optimizer', 'other', 'training_step'])
    """
    spec = _method(method)
    spec.per_loader(batch_size)
    config = {"method": method, "model": model, "batch_size": batch_size, "size": size, "steps": steps}
    config["options"] = _options(options)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        config["out"] = str(out)
        command = [sys.executable, "-m", "lightning_cmp.bench.trainer", "--run", json.dumps(config)]
        path = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
        code, output = _run_bounded(command, Path(tmp), {**env, **dict(spec.env)}, timeout, method)
        if code != 0 or not out.exists():
            raise RuntimeError(f"Trainer run {method}: exit {code}\n{output[-6000:]}")
        return dict(json.loads(out.read_text()))


def _run_bounded(command: list[str], cwd: Path, env: dict[str, str], timeout: float, name: str) -> tuple[int, str]:
    """Run ``command`` in a session of its own; past ``timeout`` (and after it ends) kill what is left of it: the
    ranks Lightning started from it."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        raise TimeoutError(f"Trainer run {name} took more than {timeout:g} s; killed\n{output[-6000:]}") from None
    _kill_group(proc.pid)
    return proc.returncode, output


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # every process of the run has exited
        os.killpg(pgid, signal.SIGKILL)


def summarize_trainer(runs: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """One row from repeated runs of a method: medians over repeats of each run's median step, and the spread.

    ``parts``: each part's median over a run's steps, then over the runs (medians need not add up to ``step_s``).

    Examples:
        >>> parts = {"training_step": [0.1, 0.1], "backward": [0.2, 0.2], "optimizer": [0.0, 0.0], "other": [0, 0]}
        >>> row = summarize_trainer([{"step_s": [0.75, 0.25], "parts": parts}, {"step_s": [0.25], "parts": parts}], 8)
        >>> row["step_s"], row["step_s_spread"], row["samples_per_s_spread"], row["parts"]["backward"]
        (0.375, [0.25, 0.5], [16.0, 32.0], 0.2)
    """
    medians = [statistics.median(run["step_s"]) for run in runs]
    step = statistics.median(medians)
    return {
        "samples_per_s": batch_size / step,
        "samples_per_s_repeats": [batch_size / s for s in medians],
        "samples_per_s_spread": [batch_size / max(medians), batch_size / min(medians)],
        "step_s": step,
        "step_s_repeats": medians,
        "step_s_spread": [min(medians), max(medians)],
        "parts": {p: statistics.median(statistics.median(run["parts"][p]) for run in runs) for p in PARTS},
    }


def _breakdown(marks: list[dict[str, float]], warmup: int = _WARMUP) -> dict[str, Any]:
    """Step seconds and parts from each step's clock marks; the last step (no next start) and ``warmup`` left out.

    Examples:
        >>> step = {"start": 0.0, "training_step": 1.0, "training_step_end": 3.0, "backward": 3.5,
        ...         "backward_end": 6.0, "optimizer": 6.0, "optimizer_end": 7.0}
        >>> _breakdown([step, {k: v + 8 for k, v in step.items()}], warmup=0)
        {'step_s': [8.0], 'parts': {'training_step': [2.0], 'backward': [2.5], 'optimizer': [1.0], 'other': [2.5]}}
    """
    step_s: list[float] = []
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    for i, (now, following) in enumerate(pairwise(marks)):
        missing = [k for k in _MARKS if k not in now]
        if missing:
            raise RuntimeError(f"step {i} has no clock mark for {', '.join(missing)}: a hook did not run")
        step = following["start"] - now["start"]
        spans = {p: now[f"{p}_end"] - now[p] for p in PARTS[:3]}
        step_s.append(step)
        for part, seconds in {**spans, "other": step - sum(spans.values())}.items():
            parts[part].append(seconds)
    return {"step_s": step_s[warmup:], "parts": {p: v[warmup:] for p, v in parts.items()}}


_MARKS = ("start", *(m for p in PARTS[:3] for m in (p, f"{p}_end")))


# -- the workers: one Trainer run (Lightning imported here only: the driver's importers need not load it) ----------
def _fit(config: dict[str, Any]) -> None:
    """Fit ``config``'s method; rank 0 writes its steps' times and parts to ``config["out"]``."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    spec = METHODS[config["method"]]
    torch.set_num_threads(spec.threads)
    batch_size, size, steps = config["batch_size"], config["size"], config["steps"]
    count = (steps + 4) * batch_size  # every loader has a batch for each of the steps + 3 run
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(count, 3, size, size, generator=g), torch.randint(0, 10, (count,), generator=g))
    clock = _step_clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=spec.workers,
        strategy=_strategy(spec, config["options"]),
        max_steps=steps + _WARMUP + 1,
        callbacks=[clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    module = _module(config["model"], size, clock)
    trainer.fit(module, DataLoader(dataset, batch_size=spec.per_loader(batch_size), shuffle=False))
    if trainer.global_rank == 0:
        Path(config["out"]).write_text(json.dumps(_breakdown(clock.steps)))
    if torch.distributed.is_initialized():  # stop gloo's threads now: left to interpreter exit, they may abort it
        torch.distributed.destroy_process_group()


def _strategy(spec: TrainerMethod, options: dict[str, Any]) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_cmp import CMPStrategy

    if spec.strategy == "ddp":
        return DDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=options["bucket_cap_mb"])
    if spec.strategy == "cmp":
        return CMPStrategy(**dict(spec.options))
    return spec.strategy  # "auto", "sharded_dp"


def _step_clock() -> Any:
    """A callback that starts a dict of marks at each ``on_train_batch_start`` and marks the backward's and the
    optimizer step's starts and the backward's end in it (the module marks the rest)."""
    import lightning as L
    from typing_extensions import override

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def mark(self, name: str) -> None:
            self.steps[-1][name] = time.perf_counter()

        @override
        def on_train_batch_start(
            self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            self.steps.append({"start": time.perf_counter()})

        @override
        def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
            self.mark("backward")

        @override
        def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.mark("backward_end")

        @override
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            self.mark("optimizer")

    return StepClock()


def _module(model: str, size: int, clock: Any) -> Any:
    """``build(model, size)`` trained with cross-entropy and SGD (lr 0.01, momentum 0.9); it marks its
    ``training_step``'s start and end and its ``optimizer_step``'s end on ``clock``."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch import Tensor
    from typing_extensions import override

    from lightning_cmp.bench.models import build

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build(model, size)

        @override
        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        @override
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            clock.mark("training_step")
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            clock.mark("training_step_end")
            return loss

        @override
        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            super().optimizer_step(*args, **kwargs)
            clock.mark("optimizer_end")

        @override
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return Module()


# -- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``--run '<json>'``: one run (the workers' entry); else each method's summary of ``--repeats`` runs."""
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.trainer", description=__doc__.split("\n")[0])
    p.add_argument("methods", nargs="*", metavar="METHOD", help=f"any of {', '.join(METHODS)}")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (every method the same)")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--bucket-cap-mb", type=float, default=OPTIONS["bucket_cap_mb"])
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        _fit(json.loads(args.run))
        return {}
    unknown = [name for name in args.methods if name not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; use any of {', '.join(METHODS)}")
    rows: dict[str, Any] = {}
    for name in args.methods:
        runs = [
            run_trainer(name, args.model, args.batch_size, args.size, args.steps, bucket_cap_mb=args.bucket_cap_mb)
            for _ in range(args.repeats)
        ]
        rows[name] = {"label": METHODS[name].label, **summarize_trainer(runs, args.batch_size)}
        print(json.dumps({name: rows[name]}), flush=True)
    return rows


if __name__ == "__main__":
    main()
