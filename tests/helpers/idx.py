"""Fashion-MNIST-format files for tests: IDX bytes and a small fake dataset with the real file names."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

__all__ = ["idx_bytes", "write_fake_fashion_mnist"]


def idx_bytes(t: torch.Tensor, type_code: int = 0x08) -> bytes:
    """``t`` in the IDX format: magic number (type code, rank), big-endian sizes, big-endian values."""
    header = struct.pack(">BBBB", 0, 0, type_code, t.dim()) + b"".join(struct.pack(">I", s) for s in t.shape)
    return header + t.numpy().astype(t.numpy().dtype.newbyteorder(">")).tobytes()


def write_fake_fashion_mnist(root: Path, n_train: int, n_test: int) -> None:
    """Random 28x28 images and labels under Fashion-MNIST's file names (images gzipped, labels plain)."""
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))  # plain, not gzipped
