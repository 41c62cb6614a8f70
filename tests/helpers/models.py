"""Small models and data shared by the multi-process tests (importable by spawned workers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torchvision
from torch import Tensor, nn

from lightning_cmp.bench.models import train_steps

__all__ = ["MODELS", "batches", "build", "train_reference", "train_steps"]


def sequential_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def resnet18_no_bn() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=nn.Identity)


def resnet18_bn_eval() -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BatchNorm is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def sequential_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


MODELS = {
    "sequential": sequential_cnn,
    "resnet18": resnet18_no_bn,
    "resnet18_bn_eval": resnet18_bn_eval,
    "sequential_bn": sequential_bn,  # BatchNorm in training mode: equal to one device only on whole batches (mp)
}


def build(name: str) -> nn.Module:
    """The same initial weights in every process."""
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    if name.endswith("bn_eval"):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return model


def batches(steps: int, batch_size: int = 8, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
        for _ in range(steps)
    ]


def train_reference(name: str, steps: int, lr: float = 0.05) -> tuple[dict[str, Tensor], list[float]]:
    """Single-process SGD with momentum on the same batches: the ground truth for every schedule."""
    model = build(name)
    losses = train_steps(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), batches(steps))
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def averaging_dtype(averaging: str) -> torch.dtype:
    """The dtype a schedule is compared with one device in: averaging weights rounds differently from averaging
    gradients, and over a few steps a ReLU or max-pool tie can amplify float32's difference to ~5e-4 on some CPUs
    (float64: ~1e-15), so the parameter form is compared in float64."""
    return torch.float64 if averaging == "parameter" else torch.float32


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build models and batches in ``dtype`` inside the block."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
