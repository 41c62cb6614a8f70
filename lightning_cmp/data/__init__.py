"""Data modules for examples, tests and benchmarks."""

from lightning_cmp.data.base import InMemoryImageDataModule, augment
from lightning_cmp.data.cifar import CIFAR10DataModule, CIFAR100DataModule, read_cifar
from lightning_cmp.data.fashion_mnist import DEBIAN_DIR, FashionMNISTDataModule, read_idx

__all__ = [
    "DEBIAN_DIR",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "InMemoryImageDataModule",
    "augment",
    "read_cifar",
    "read_idx",
]
