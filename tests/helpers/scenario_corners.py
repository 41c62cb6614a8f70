"""Corners a user's LightningModule reaches: a mixed-precision step skipped on one stage only, parameters that
get no gradient, an unshuffled loader, and a ``training_step`` that reads parameters directly.

``python -m tests.helpers.scenario_corners '<json config>'`` (``{"out": ..., "devices": 3}``): Lightning starts
the other workers by re-running it. One launch runs several fits in turn; every rank writes
``<out>/rank<r>.pt`` with what each fit left (weights, the loss scale, the batches it saw, an error's text).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_cmp

FEATURES = 8
PROBE_STEP = 1  # the batch whose probe column overflows the fp16 loss scale's gradients in stage 0 only
STEPS = 4
BATCH = 8


class Gate(nn.Module):
    """Drops column 0 of the input (a probe) after multiplying it by ``w``, which starts at zero.

    The output never sees the probe (0 * x0), but ``w``'s gradient is ``sum(x0 * g)``: a huge x0 makes it inf
    under a loss scale, in stage 0 only, while every other gradient stays finite.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(FEATURES))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 1:] + self.w * x[:, :1]


class Branchy(nn.Module):
    """A block holding a layer it never calls: that layer's parameters get no gradient, ever."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.used = nn.Linear(n_in, n_out)
        self.unused = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def build() -> nn.Sequential:
    # K=3, uniform cuts [2, 4]: stage 0 = Gate, Branchy; stage 1 = ReLU, Branchy; stage 2 = ReLU, Linear.
    torch.manual_seed(0)
    return nn.Sequential(Gate(), Branchy(FEATURES, 16), nn.ReLU(), Branchy(16, 16), nn.ReLU(), nn.Linear(16, 4))


class LitCorners(L.LightningModule):
    def __init__(self, read_parameters: bool = False) -> None:
        super().__init__()
        self.net = build()
        self.read_parameters = read_parameters
        self.seen: list[float] = []  # the first sample's first feature of every training batch: its order

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.seen.append(float(x[0, 1]))
        loss = F.cross_entropy(self(x).float(), y)
        if self.read_parameters:  # an L2 penalty written by hand: it reads every parameter
            loss = loss + 1e-2 * sum(p.pow(2).sum() for p in self.parameters())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)


def data(probe: bool) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * BATCH, 1 + FEATURES, generator=g)
    x[:, 0] = 0.0
    if probe:
        x[PROBE_STEP * BATCH, 0] = 1e38
    return TensorDataset(x, torch.randint(0, 4, (STEPS * BATCH,), generator=g))


def loader(probe: bool) -> DataLoader:
    """What a user writes for a fixed order: ``shuffle=False``, no sampler."""
    return DataLoader(data(probe), batch_size=BATCH, shuffle=False)


def fp16_plugin() -> MixedPrecision:
    """fp16 autocast with a loss scaler on the CPU (``Trainer(precision="16-mixed")`` picks bf16 on CPU)."""
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))


def trainer_for(devices: int | str, fp16: bool, accelerator: str = "cpu", **kw: Any) -> L.Trainer:
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[fp16_plugin()] if fp16 else None,
        **kw,
    )


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out, devices = Path(cfg["out"]), cfg["devices"]
    result: dict[str, Any] = {}

    fp16, trainer = LitCorners(), trainer_for(devices, fp16=True, strategy=lightning_cmp.CMPStrategy())
    trainer.fit(fp16, loader(probe=True))
    scaler = trainer.precision_plugin.scaler  # type: ignore[attr-defined]
    result["fp16"] = {"state": _state(fp16), "scale": float(scaler.get_scale())}

    fp32, trainer = LitCorners(), trainer_for(devices, fp16=False, strategy=lightning_cmp.CMPStrategy())
    trainer.fit(fp32, loader(probe=False))
    result["fp32"] = {"state": _state(fp32), "seen": fp32.seen}

    rank = trainer.global_rank
    torch.save(result, out / f"rank{rank}.pt")  # before the last fit, which is meant to fail

    # The last two fits are meant to fail; each failure leaves the process ready for the next fit.
    for case, module, callbacks in [
        ("drift", LitCorners(), [NudgeOnRankZero()]),
        ("reads", LitCorners(read_parameters=True), []),
    ]:
        trainer = trainer_for(devices, fp16=False, strategy=lightning_cmp.CMPStrategy(), callbacks=callbacks)
        try:
            trainer.fit(module, loader(probe=False))
            result[case] = {"error": None}
        except Exception as err:  # the test checks the type and the text
            result[case] = {"error": f"{type(err).__name__}: {err}"}
        torch.save(result, out / f"rank{rank}.pt")


class NudgeOnRankZero(Callback):
    """An in-place parameter update outside the optimizer, on one worker only: its copy drifts from its mirror."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 2:
            with torch.no_grad():
                pl_module.net[5].bias.add_(1e-3)  # type: ignore[index]


if __name__ == "__main__":
    main()
