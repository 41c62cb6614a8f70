"""Shared in-memory image DataModule: seeded split, limits, loaders and batch augmentation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["InMemoryImageDataModule", "augment"]


def augment(x: torch.Tensor, crop_padding: int, flip: bool, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Random crop after ``crop_padding`` pixels of ``fill`` on each side, then a random horizontal flip.

    Works on a whole (N, C, H, W) batch at once with its own generator, so every worker that draws the same
    batches draws the same crops (pipelines need every worker to see the same batch).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment(torch.zeros(8, 3, 32, 32), crop_padding=4, flip=True, fill=0.0, generator=g).shape
        torch.Size([8, 3, 32, 32])
    """
    n, _, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p), value=fill)
        oy, ox = (torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device) for _ in range(2))
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
        x = padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2).contiguous()
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class InMemoryImageDataModule(L.LightningDataModule):
    """Base of the image DataModules: subclasses load (N, C, H, W) float tensors; this class does the rest.

    Validation is ``val_size`` images split off the training set with ``seed``; ``limit`` keeps the first N
    remaining training images and ``limit_eval`` the first N validation and test images. Training batches
    are augmented (``random_crop``, ``horizontal_flip``) after transfer to the device, from a generator
    seeded with ``seed``.
    """

    #: value of a black pixel after normalisation, used for the crop padding
    fill: float = 0.0
    #: whether ``prepare_data`` may fetch missing files (subclasses take it as an argument)
    download: bool = False

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        val_size: int,
        seed: int,
        limit: int | None,
        limit_eval: int | None,
        random_crop: int,
        horizontal_flip: bool,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("limit", limit), ("limit_eval", limit_eval)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if random_crop < 0:
            raise ValueError(f"random_crop={random_crop} is a padding in pixels; use 0 (off) or more, e.g. 4")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.limit = limit
        self.limit_eval = limit_eval
        self.random_crop = random_crop
        self.horizontal_flip = horizontal_flip
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._augment_generator = torch.Generator().manual_seed(seed)

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One split (``"train"`` or ``"test"``) as stored: (N, C, H, W) uint8 images and int64 labels."""
        raise NotImplementedError

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Stored uint8 images to the float tensors the model sees (only the images kept are converted)."""
        raise NotImplementedError

    def _missing(self) -> list[str]:
        """Names of the data files that are not there (none: ready to load)."""
        raise NotImplementedError

    def _no_data_message(self, why: str) -> str:
        """What is missing, where it was looked for and how to get it."""
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the files (torchvision); any exception means offline or blocked."""
        raise NotImplementedError

    @override
    def prepare_data(self) -> None:
        """Download once (rank 0 only, as Lightning calls it) if the files are missing and ``download`` is set."""
        if not self._missing():
            return
        if not self.download:
            raise FileNotFoundError(self._no_data_message("download=False"))
        try:
            self._download()
        except Exception as e:  # URLError, RuntimeError, OSError: all mean "offline or blocked"
            raise RuntimeError(self._no_data_message(f"download failed: {type(e).__name__}: {e}")) from e

    def check_data(self) -> None:
        """Raise ``FileNotFoundError`` with the fix when the files are missing."""
        if self._missing():
            raise FileNotFoundError(self._no_data_message("call prepare_data() first or check data_dir"))

    @override
    def setup(self, stage: str) -> None:
        """Build the tensors once; later calls (fit, then test) reuse them."""
        if self.train_set is not None:
            return
        self.check_data()
        x, y = self.load("train")
        if self.val_size >= len(y):
            raise ValueError(f"val_size={self.val_size} leaves no training images out of {len(y)}")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[: self.val_size], order[self.val_size :].sort().values[: self.limit]
        val = val[: self.limit_eval]
        self.train_set = self.dataset(self.normalize(x[train]), y[train])
        self.val_set = self.dataset(self.normalize(x[val]), y[val])
        x, y = self.load("test")
        self.test_set = self.dataset(self.normalize(x[: self.limit_eval]), y[: self.limit_eval])

    def dataset(self, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        return TensorDataset(x, y)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches (the same way on every worker: one seeded generator per worker)."""
        trainer = self.trainer
        if trainer is None or not trainer.training or not (self.random_crop or self.horizontal_flip):
            return batch
        x, y = batch
        return augment(x, self.random_crop, self.horizontal_flip, self.fill, self._augment_generator), y
