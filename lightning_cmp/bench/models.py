"""The benchmark's models and data: a VGG-16-style CNN, torchvision ResNet-18 (ImageNet and CIFAR stems), and a
tiny CNN for --quick; ``torchvision:<name>`` builds any torchvision classifier (e.g. ResNet-50, VGG-16 at 128x128)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

__all__ = ["MODELS", "build", "make_batches", "train_steps"]

# VGG-16's 13 convolutions (configuration "D"); "M" is a 2x2 max-pool. Widths are halved to fit CPUs.
_VGG16 = (32, 32, "M", 64, 64, "M", 128, 128, 128, "M", 256, 256, 256, "M", 256, 256, 256, "M")


def vgg16(num_classes: int = 10) -> nn.Module:
    """A VGG-16-style CNN for 32x32 inputs: 13 conv+BN+ReLU layers at half width, then a linear classifier.

    Examples:
        >>> vgg16()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(item, int)
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, num_classes))


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (random weights)."""
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (a 3x3 stride-1 first convolution, no max-pool), as CIFAR papers
    train it: at 32x32 its last stage runs at 4x4 instead of the ImageNet stem's 1x1.

    Examples:
        >>> resnet18_cifar()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def tiny(num_classes: int = 10) -> nn.Module:
    """Four conv blocks and a classifier: what ``--quick`` trains."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )  # fmt: skip


MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": vgg16,
    "resnet18": resnet18,
    "resnet18_cifar": resnet18_cifar,
    "tiny": tiny,
}


def build(name: str, size: int = 32) -> nn.Module:
    """Model ``name`` with the same initial weights in every process; ``"torchvision:<name>"`` is a torchvision
    classifier sized for ``size`` inputs with BatchNorm in training mode (`zoo.build`).

    Examples:
        >>> sum(p.numel() for p in build("tiny").parameters()) > 0
        True
    """
    if name.startswith("torchvision:"):
        from lightning_cmp.bench.zoo import build as build_torchvision

        return build_torchvision(name.removeprefix("torchvision:"), size, train_batchnorm=True)
    torch.manual_seed(0)
    return MODELS[name]()


def make_batches(count: int, batch_size: int, size: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` random (images, labels) batches, identical in every process.

    Examples:
        >>> x, y = make_batches(1, 4, 32)[0]
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 3, 32, 32), (4,))
    """
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
        for _ in range(count)
    ]


def train_steps(
    forward: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    data: list[tuple[Tensor, Tensor]],
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Cross-entropy SGD steps over ``data``; returns the losses. ``forward`` is a model or a pipeline (given the
    loss per microbatch when it asks for it)."""
    losses = []
    for x, y in data:
        if getattr(forward, "loss_per_microbatch", False):
            out = forward(x, loss_fn=lambda rows, output, y=y: F.cross_entropy(output, y[rows]))  # type: ignore[call-arg]
        else:
            out = forward(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses
