"""A crash while saving keeps the previous checkpoint whole: files are written aside and renamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_cmp import CMPStrategy
from lightning_cmp.checkpoint_io import AtomicCheckpointIO


def test_the_strategy_saves_atomically_by_default() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cmp", logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # a user's own CheckpointIO still wins
    custom = L.pytorch.plugins.TorchCheckpointIO()
    assert CMPStrategy(checkpoint_io=custom).checkpoint_io is custom


def test_a_crash_while_saving_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    good = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's private 0600

    real_save = torch.save

    def crash_half_way(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.seek(len(good) // 2)
        f.truncate()  # half a file is on disk when the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left on device"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == good
    assert os.listdir(path.parent) == ["last.ckpt"]  # the temporary file is gone too
    assert io.load_checkpoint(path)["step"] == 1

    monkeypatch.setattr(torch, "save", real_save)
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3
    assert os.listdir(path.parent) == ["last.ckpt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
