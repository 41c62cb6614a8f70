"""CIFAR DataModules on a fake torchvision folder, and the shared batch augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_cmp.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, augment
from tests.helpers.idx import write_fake_fashion_mnist
from tests.test_recipes import write_fake_cifar10


def test_cifar10_reads_the_torchvision_folder(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, per_file=8)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4, val_size=8, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.test_set)) == (32, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long


def test_cifar_missing_offline_says_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    dm = CIFAR100DataModule(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cifar-100-python.*download failed: OSError") as info:
        dm.prepare_data()
    assert "copy an existing cifar-100-python/ folder" in str(info.value)
    with pytest.raises(FileNotFoundError, match="download=False"):
        CIFAR100DataModule(str(tmp_path), download=False).prepare_data()


def test_augment_is_seeded_and_keeps_shapes() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = augment(x, 2, True, -1.0, torch.Generator().manual_seed(1))
    b = augment(x, 2, True, -1.0, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(augment(x, 0, False, 0.0, torch.Generator()), x)
    # a crop of the padded image: every value is an original pixel of the same image and channel, or the fill
    for n in range(2):
        for c in range(3):
            assert set(a[n, c].flatten().tolist()) <= set(x[n, c].flatten().tolist()) | {-1.0}


def test_fashion_mnist_augments_training_batches_only(tmp_path: Path) -> None:
    # Fake files: the test must not depend on the Debian package being installed by hand.
    write_fake_fashion_mnist(tmp_path, n_train=20, n_test=5)
    dm = FashionMNISTDataModule(
        str(tmp_path), batch_size=8, val_size=5, limit=8, limit_eval=5, random_crop=4, horizontal_flip=True
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    class Training:
        training = True

    dm.trainer = Training()  # type: ignore[assignment]
    x, _ = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == batch[0].shape and not torch.equal(x, batch[0])
    Training.training = False
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]


def test_bad_augmentation_argument() -> None:
    with pytest.raises(ValueError, match="random_crop=-1"):
        CIFAR10DataModule(random_crop=-1)
