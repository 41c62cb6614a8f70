"""ImageClassifier: shapes, CIFAR stem and head, a short Trainer run with PredictionWriter, checkpoint round trip."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_cmp.callbacks import PredictionWriter
from lightning_cmp.models import ImageClassifier


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_forward_shape(cifar_stem: bool) -> None:
    model = ImageClassifier("resnet18", num_classes=7, cifar_stem=cifar_stem)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_stem_keeps_resolution() -> None:
    net = ImageClassifier(cifar_stem=True).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_cifar_head_replaces_the_imagenet_classifier_of_vgg() -> None:
    model = ImageClassifier("vgg16", num_classes=10, cifar_head=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.net.classifier, torch.nn.Linear) and model.net.classifier.in_features == 512
    assert sum(p.numel() for p in model.parameters()) < 15_000_000  # torchvision's head alone: ~120M
    with pytest.raises(ValueError, match="cifar_head=True only applies to VGGs"):
        ImageClassifier("resnet18", cifar_head=True)


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
    writer = PredictionWriter(tmp_path / "out" / "predictions.csv")
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[writer], enable_progress_bar=False, logger=False)
    predictions = trainer.predict(model, dataloaders=_loader())
    assert predictions is not None and predictions[0].shape == (4,)
    with (tmp_path / "out" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert writer.rows == len(rows) == 16 and [int(r["index"]) for r in rows] == list(range(16))
    assert [int(r["prediction"]) for r in rows] == torch.cat(predictions).tolist()
    assert [int(r["target"]) for r in rows] == _loader().dataset.tensors[1].tolist()


def test_prediction_writer_needs_a_tensor_per_sample(tmp_path: Path) -> None:
    class Dicts(ImageClassifier):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return {"logits": self(batch[0])}

    trainer = L.Trainer(
        accelerator="cpu", callbacks=[PredictionWriter(tmp_path / "p.csv")], enable_progress_bar=False, logger=False
    )
    with pytest.raises(TypeError, match=r"PredictionWriter writes one CSV row per sample.*got dict"):
        trainer.predict(Dicts(), dataloaders=_loader())


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
