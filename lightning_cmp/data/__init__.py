"""Data modules for examples, tests and benchmarks."""

from lightning_cmp.data.fashion_mnist import DEBIAN_DIR, FashionMNISTDataModule, read_idx

__all__ = ["DEBIAN_DIR", "FashionMNISTDataModule", "read_idx"]
