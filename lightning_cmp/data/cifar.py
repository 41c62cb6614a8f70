"""CIFAR-10 and CIFAR-100 as in-memory tensors, read from torchvision's pickle folders (download optional)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
from typing_extensions import override

from lightning_cmp.data.base import InMemoryImageDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "read_cifar"]


def read_cifar(folder: str | Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read torchvision-format CIFAR pickle batches into (N, 3, 32, 32) uint8 images and int64 labels.

    Examples:
        >>> x, y = read_cifar("data/cifar-10-batches-py", ["test_batch"], "labels")  # doctest: +SKIP
        >>> x.shape, y.shape  # doctest: +SKIP
        (torch.Size([10000, 3, 32, 32]), torch.Size([10000]))
    """
    images, labels = [], []
    for name in files:
        with (Path(folder) / name).open("rb") as f:
            entry: dict[str, Any] = pickle.load(f, encoding="latin1")
        images.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry[label_key], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class _CIFARDataModule(InMemoryImageDataModule):
    """CIFAR held as normalised tensors in memory; the subclasses name the folder, files and statistics."""

    folder: ClassVar[str]
    train_files: ClassVar[list[str]]
    test_files: ClassVar[list[str]]
    label_key: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    dataset_class: ClassVar[str]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        limit: int | None = None,
        limit_eval: int | None = None,
        download: bool = True,
        random_crop: int = 4,
        horizontal_flip: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, val_size, seed, limit, limit_eval, random_crop, horizontal_flip)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download = download

    @property
    def root(self) -> Path:
        """The torchvision folder holding the pickle batches, e.g. ``data/cifar-10-batches-py``."""
        return self.data_dir / self.folder

    def _missing(self) -> list[str]:
        return [name for name in self.train_files + self.test_files if not (self.root / name).is_file()]

    def _no_data_message(self, why: str) -> str:
        name = type(self).__name__
        return (
            f"{self.dataset_class} not found in {self.root} ({why}); missing: {', '.join(self._missing())}.\n"
            f"Fix: run once with network access and {name}(data_dir={str(self.data_dir)!r}, download=True) "
            f"(torchvision fetches ~170 MB), or copy an existing {self.folder}/ folder into {self.data_dir}, "
            "or pass data_dir= the directory that holds it."
        )

    def _download(self) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, self.dataset_class)(str(self.data_dir), train=True, download=True)

    @override
    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files = self.train_files if split == "train" else self.test_files
        return read_cifar(self.root, files, self.label_key)

    @override
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 training and 10,000 test 32x32 colour images, 10 classes) in memory.

    Reads ``data_dir/cifar-10-batches-py`` (torchvision's layout); ``download=True`` fetches it with
    torchvision when it is missing. Training batches get the standard augmentation by default
    (4-pixel random crop, horizontal flip).

    Args:
        data_dir: directory holding (or to receive) ``cifar-10-batches-py``.
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
        val_size: training images held out for validation (split with ``seed``).
        seed: seed of the split, of the training shuffle and of the augmentation.
        limit: use only the first N training images.
        limit_eval: use only the first N validation and test images.
        download: download with torchvision when the files are missing.
        random_crop: pad by this many pixels and crop back at random (0: off).
        horizontal_flip: flip half of the training images left-right.

    Examples:
        >>> dm = CIFAR10DataModule("data", batch_size=32, limit=1000)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
    """

    folder = "cifar-10-batches-py"
    train_files: ClassVar[list[str]] = [f"data_batch_{i}" for i in range(1, 6)]
    test_files: ClassVar[list[str]] = ["test_batch"]
    label_key = "labels"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    dataset_class = "CIFAR10"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (the CIFAR-10 layout with 100 fine classes) in memory; same arguments as CIFAR-10.

    Reads ``data_dir/cifar-100-python``; use ``ImageClassifier(num_classes=100)`` with it.

    Examples:
        >>> dm = CIFAR100DataModule("data", batch_size=32, limit=1000)  # doctest: +SKIP
    """

    folder = "cifar-100-python"
    train_files: ClassVar[list[str]] = ["train"]
    test_files: ClassVar[list[str]] = ["test"]
    label_key = "fine_labels"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    dataset_class = "CIFAR100"
