"""ImageClassifier: shapes, a short Trainer run, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_cmp.models import ImageClassifier


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_forward_shape(cifar_stem: bool) -> None:
    model = ImageClassifier("resnet18", num_classes=7, cifar_stem=cifar_stem)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_stem_keeps_resolution() -> None:
    net = ImageClassifier(cifar_stem=True).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown arch 'resnet19'.*resnet18"):
        ImageClassifier("resnet19")


def test_cifar_stem_only_for_resnets() -> None:
    with pytest.raises(ValueError, match="only applies to ResNets"):
        ImageClassifier("mobilenet_v3_small", cifar_stem=True)


def _loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def test_fit_validate_test_predict(tmp_path: Path) -> None:
    model = ImageClassifier("resnet18")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, fast_dev_run=2, default_root_dir=tmp_path, enable_progress_bar=False, logger=False
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(model, dataloaders=_loader(), verbose=False)
    assert 0.0 <= results["test_acc"] <= 1.0 and results["test_loss"] > 0
    predictions = trainer.predict(model, dataloaders=_loader())
    assert predictions is not None and predictions[0].shape == (4,)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = ImageClassifier("resnet18", lr=0.1, cifar_stem=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(model, train_dataloaders=_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams["lr"] == 0.1 and loaded.hparams["cifar_stem"] is True
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    loaded.eval()
    assert torch.allclose(model(x), loaded(x))
