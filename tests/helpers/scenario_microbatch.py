"""Micro-batched ``cmp`` through the Trainer: several fits in one launch, each compared with one device by the test.

``python -m tests.helpers.scenario_microbatch '<json config>'`` (``{"out": ..., "devices": 3}``): Lightning starts
the other workers by re-running it. Every rank writes ``<out>/rank<r>.pt`` with, per fit, the weights, what was
logged after every batch, the metric's epoch value, the fp16 loss scale, or an error's text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_cmp
from tests.helpers.scenario_corners import fp16_plugin

FEATURES, CLASSES, BATCH, STEPS = 8, 4, 12, 6


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


class LitMicro(L.LightningModule):
    """Logs its loss and a torchmetrics accuracy, as users do; ``mix`` and ``noise`` make it misbehave."""

    def __init__(self, reduction: str = "mean", mix: bool = False, noise: bool = False) -> None:
        super().__init__()
        self.net = build()
        self.reduction = reduction
        self.mix = mix
        self.noise = noise
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro")
        self.steps = 0  # calls of training_step: one per batch, plus one per microbatch on a last stage's rank

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.steps += 1
        if self.noise:  # random augmentation inside training_step: differs between the calls
            x = x + 0.1 * torch.randn_like(x)
        out = self(x)
        if self.mix:  # centring the logits over the batch mixes samples: not a per-sample loss
            out = out - out.mean(0, keepdim=True) * out.std()
        loss = F.cross_entropy(out, y, reduction=self.reduction)
        self.accuracy(out, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.accuracy, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(STEPS * BATCH, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (STEPS * BATCH,), generator=g)  # different labels in every batch
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Recorder(Callback):
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []
        self.cuts: tuple[list[int], list[int]] | None = None  # (forward, backward) cuts the pipeline ran

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        pipeline = getattr(trainer.strategy, "_pipeline", None)
        if pipeline is not None:
            self.cuts = (pipeline.forward_cuts, pipeline.cuts)


def fit(
    devices: int | str, module: LitMicro, strategy: Any = None, fp16: bool = False, **kw: Any
) -> tuple[L.Trainer, Recorder]:
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if strategy is not None else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        plugins=[fp16_plugin()] if fp16 else None,
        **kw,
    )
    trainer.fit(module, loader())
    return trainer, recorder


BIPARTITION = {"forward": [3, 5], "backward": [2, 4]}
#: fit name -> (CMPStrategy keyword arguments, Trainer keyword arguments, fp16)
FITS: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {
    "n2": ({"num_microbatches": 2}, {}, False),
    "n4_accumulate": ({"num_microbatches": 4}, {"accumulate_grad_batches": 2}, False),
    "n2_parameter": ({"num_microbatches": 2, "averaging": "parameter"}, {}, False),
    "n2_fp16": ({"num_microbatches": 2}, {}, True),
    "n2_sum": ({"num_microbatches": 2}, {}, False),
    # Bi-Partition: blocks 2 and 4 run their forward on the worker before the one that runs their backward
    "bip_mp": ({"schedule": "mp", "partition": BIPARTITION}, {}, False),
    "bip_gpipe": ({"schedule": "gpipe", "num_microbatches": 2, "partition": BIPARTITION}, {}, False),
    "bip_cmp": ({"partition": BIPARTITION}, {}, False),
    "bip_cmp_n2": ({"num_microbatches": 2, "partition": BIPARTITION}, {}, False),
    "bip_policy": ({"schedule": "mp", "partition": "bipartition"}, {}, False),  # cuts from measured costs
}
#: fit name -> LitMicro keyword arguments (with num_microbatches=2)
MODULES: dict[str, dict[str, Any]] = {"n2_sum": {"reduction": "sum"}}
FAILING = {"mix": {"mix": True}, "noise": {"noise": True}}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out, devices = Path(cfg["out"]), cfg["devices"]
    result: dict[str, Any] = {}
    rank = 0
    for name, (options, trainer_kw, fp16) in FITS.items():
        module = LitMicro(**MODULES.get(name, {}))
        trainer, recorder = fit(devices, module, lightning_cmp.CMPStrategy(**options), fp16, **trainer_kw)
        rank = trainer.global_rank
        result[name] = {
            "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "logged": recorder.logged,
            "steps": module.steps,
            "scale": float(trainer.precision_plugin.scaler.get_scale()) if fp16 else None,  # type: ignore[attr-defined]
            "cuts": recorder.cuts,
        }
    torch.save(result, out / f"rank{rank}.pt")
    for name, module_kw in FAILING.items():  # meant to fail; each failure leaves the process ready for the next
        try:
            fit(devices, LitMicro(**module_kw), lightning_cmp.CMPStrategy(num_microbatches=2))
            result[name] = {"error": None}
        except Exception as err:  # the test checks the type and the text
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
