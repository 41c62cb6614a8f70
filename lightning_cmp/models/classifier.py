"""An image classifier LightningModule wrapping any torchvision classification model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

__all__ = ["ImageClassifier"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _build(arch: str, num_classes: int, cifar_stem: bool, cifar_head: bool) -> nn.Module:
    classifiers = torchvision.models.list_models(module=torchvision.models)
    if arch not in classifiers:
        raise ValueError(f"unknown arch {arch!r}; valid torchvision classifiers: {', '.join(classifiers)}")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if cifar_stem:
        if not isinstance(net, torchvision.models.ResNet):
            raise ValueError(f"cifar_stem=True only applies to ResNets, not {arch!r}; use cifar_stem=False")
        # 32x32 inputs: a 3x3 stride-1 stem without max-pool keeps the 32x32 resolution into layer1.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if cifar_head:
        if not isinstance(net, torchvision.models.VGG):
            raise ValueError(f"cifar_head=True only applies to VGGs, not {arch!r}; use cifar_head=False")
        # The ImageNet head pools to 7x7 and feeds 25088 -> 4096 -> 4096 -> N (~120M weights); a 32x32 image
        # leaves the features at 512x1x1, so CIFAR VGGs classify those 512 values with one linear layer.
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Linear(512, num_classes)
        nn.init.normal_(net.classifier.weight, 0, 0.01)
        nn.init.zeros_(net.classifier.bias)
    return net


class ImageClassifier(L.LightningModule):
    """A torchvision classifier trained with SGD + cosine LR; logs loss and accuracy.

    Args:
        arch: a torchvision classification model name (``resnet18``, ``resnet50``, ``vgg11``, ...).
        num_classes: number of output classes.
        lr: peak SGD learning rate, annealed to zero over the run by a cosine schedule.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        cifar_stem: for ResNets on 32x32 images, replace the 7x7/2 stem and max-pool by a 3x3/1 conv.
        cifar_head: for VGGs on 32x32 images, replace the ImageNet classifier (25088 -> 4096 -> 4096 -> N) by
            one ``Linear(512, num_classes)`` after global average pooling, as CIFAR VGGs do (VGG-16: 134M -> 15M
            parameters).

    Examples:
        >>> model = ImageClassifier("resnet18", num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cmp", max_epochs=1)  # doctest: +SKIP
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cifar_stem: bool = False,
        cifar_head: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = _build(arch, num_classes, cifar_stem, cifar_head)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: Batch, prefix: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{prefix}_acc", accuracy, prog_bar=True)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).argmax(1)

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
        )
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
