"""Fashion-MNIST as in-memory tensors: IDX reader and a LightningDataModule that works offline."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_cmp.data.base import InMemoryImageDataModule

__all__ = ["DEBIAN_DIR", "FashionMNISTDataModule", "read_idx"]

#: Where the Debian package ``dataset-fashion-mnist`` puts the four ``*-ubyte.gz`` files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training images, scaled to [0, 1]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third byte of the magic number) -> (torch dtype, bytes per element).
_IDX_DTYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (plain or ``.gz``) into a tensor of its stored shape and type.

    Examples:
        >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
        >>> images.shape, images.dtype
        (torch.Size([10000, 28, 28]), torch.uint8)
    """
    path = Path(path)
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    data = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: magic number {data[:4].hex() or '(empty)'}, expected 0000TTNN with type "
            f"TT in {sorted(f'{t:02x}' for t in _IDX_DTYPES)}; is the download truncated or the wrong file?"
        )
    dtype, width = _IDX_DTYPES[data[2]]
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = offset + width * _prod(shape)
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    flat = torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8)
    if width > 1 and sys.byteorder == "little":  # IDX is big-endian: reverse the bytes of each element
        flat = flat.view(-1, width).flip(1).reshape(-1)
    return flat.view(dtype).reshape(shape).clone()


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _candidates(data_dir: Path, name: str) -> list[Path]:
    """Where a file may lie: flat (Debian layout) or in torchvision's ``FashionMNIST/raw``, gzipped or not."""
    dirs = [data_dir, data_dir / "FashionMNIST" / "raw"]
    return [d / f"{name}{ext}" for d in dirs for ext in (".gz", "")]


def _find(data_dir: Path, name: str) -> Path | None:
    return next((p for p in _candidates(data_dir, name) if p.is_file()), None)


class FashionMNISTDataModule(InMemoryImageDataModule):
    """Fashion-MNIST held as tensors in memory, padded and channel-repeated for ImageNet/CIFAR models.

    Reads the IDX files of the Debian package ``dataset-fashion-mnist`` when present; otherwise downloads
    with torchvision into ``./data``. Validation is ``val_size`` images split off the training set with a
    fixed seed; ``limit`` then keeps the first N of the remaining training images, ``limit_eval`` the first
    N of the validation and test sets.

    Args:
        data_dir: directory with the ``*-ubyte[.gz]`` files; ``None`` = the Debian directory if it exists,
            else ``./data``.
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
        pad_to: zero-pad the 28x28 images to this size (``None``: keep 28x28).
        channels: repeat the grey channel this many times (3 lets RGB models run unchanged).
        val_size: number of training images held out for validation.
        seed: seed of the train/validation split, of the training shuffle and of the augmentation.
        limit: use only the first N training images (quick runs and tests).
        limit_eval: use only the first N validation and test images.
        download: download with torchvision when the files are missing.
        random_crop: training augmentation: pad by this many pixels and crop back at random (0: off).
        horizontal_flip: training augmentation: flip half of the images left-right.

    Examples:
        >>> dm = FashionMNISTDataModule(limit=1000, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape
        torch.Size([32, 3, 32, 32])
    """

    fill = -MEAN / STD

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pad_to: int | None = 32,
        channels: int = 3,
        val_size: int = 5000,
        seed: int = 0,
        limit: int | None = None,
        limit_eval: int | None = None,
        download: bool = True,
        random_crop: int = 0,
        horizontal_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, val_size, seed, limit, limit_eval, random_crop, horizontal_flip)
        if pad_to is not None and pad_to < 28:
            raise ValueError(f"pad_to={pad_to} is smaller than the 28x28 images; use pad_to>=28 or None")
        if not 0 <= val_size < 60000:
            raise ValueError(f"val_size={val_size} must lie in [0, 60000)")
        if channels < 1:
            raise ValueError(f"channels={channels} must be >= 1")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir else (DEBIAN_DIR if DEBIAN_DIR.is_dir() else Path("data"))
        self.pad_to = pad_to
        self.channels = channels
        self.download = download

    def _missing(self) -> list[str]:
        return [name for pair in _FILES.values() for name in pair if _find(self.data_dir, name) is None]

    def _no_data_message(self, why: str) -> str:
        tried = "\n  ".join(str(p) for name in self._missing() for p in _candidates(self.data_dir, name))
        return (
            f"Fashion-MNIST not found ({why}). Tried:\n  {tried}\n"
            f"Fix: `sudo apt-get install dataset-fashion-mnist` (files go to {DEBIAN_DIR}), "
            f"or run once online with download=True to fetch them into {self.data_dir}, "
            "or pass data_dir= a directory holding the four *-ubyte.gz files."
        )

    def _download(self) -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(self.data_dir), train=True, download=True)

    @override
    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One split as stored: (N, 1, 28, 28) uint8 images and int64 labels."""
        paths = [_find(self.data_dir, name) for name in _FILES[split]]
        images, labels = (read_idx(p) for p in paths if p is not None)
        return images.unsqueeze(1), labels.long()

    @override
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Scale to [0, 1], pad with black to ``pad_to`` and standardise with the training set's statistics."""
        x = images.float().div_(255)
        if self.pad_to is not None:
            extra = self.pad_to - x.shape[-1]
            x = F.pad(x, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))  # black border
        return x.sub_(MEAN).div_(STD)

    @override
    def dataset(self, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        # expand() is a view, so the repeated channels cost no memory; the default collate stacks real copies.
        return TensorDataset(x.expand(-1, self.channels, -1, -1), y)
