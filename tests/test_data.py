"""FashionMNISTDataModule and the IDX reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from lightning_cmp.data import DEBIAN_DIR, FashionMNISTDataModule, read_idx
from tests.helpers.idx import idx_bytes, write_fake_fashion_mnist


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_plain_and_gz(tmp_path: Path, gz: bool) -> None:
    t = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    data = idx_bytes(t)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == torch.uint8
    assert torch.equal(out, t)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    t = torch.tensor([[1, -2], [70000, 3]], dtype=torch.int32)
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(t, type_code=0x0C))
    assert torch.equal(read_idx(path), t)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an IDX file: magic number 504b0304"):
        read_idx(path)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(idx_bytes(torch.zeros(4, 4, dtype=torch.uint8))[:-3])
    with pytest.raises(ValueError, match=r"header says shape \[4, 4\]"):
        read_idx(path)


needs_debian = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_DIR})",
)


@needs_debian
def test_datamodule_on_debian_files() -> None:
    dm = FashionMNISTDataModule(batch_size=16, limit=100, limit_eval=50)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 50, 50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
    assert torch.equal(x[:, 0], x[:, 2])  # the grey channel repeated
    background = x[:, :, :2, :].unique()  # the 2-pixel zero padding, normalised
    assert torch.allclose(background, torch.tensor(-0.2860 / 0.3530))


@needs_debian
def test_datamodule_split_is_fixed_and_disjoint_from_limit() -> None:
    a, b = FashionMNISTDataModule(limit=10, limit_eval=20), FashionMNISTDataModule(limit=30, limit_eval=20)
    a.setup("fit")
    b.setup("fit")
    assert a.val_set is not None and b.val_set is not None and a.train_set is not None and b.train_set is not None
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])  # same validation images whatever the limit
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1][:10])  # limit keeps the first N


def test_datamodule_no_pad_one_channel(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, n_train=20, n_test=5)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=4, pad_to=None, channels=1, val_size=5)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28)
    assert dm.train_set is not None and len(dm.train_set) == 15


def test_missing_files_with_download_disabled(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message


def test_missing_files_offline_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import FashionMNIST

    def offline(self: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error no network>")

    monkeypatch.setattr(FashionMNIST, "download", offline)
    dm = FashionMNISTDataModule(str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "download failed" in message and "no network" in message
    assert "apt-get install dataset-fashion-mnist" in message and "online" in message
    assert str(tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") in message


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pad_to=20"):
        FashionMNISTDataModule(pad_to=20)
    with pytest.raises(ValueError, match="batch_size=0"):
        FashionMNISTDataModule(batch_size=0)
