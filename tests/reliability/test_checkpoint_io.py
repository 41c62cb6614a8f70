"""A crash while saving keeps the previous checkpoint whole: files are written aside and renamed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
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


# A process that dies (SIGKILL) half-way through torch.save, as when a node is lost while checkpointing.
_KILLED_MID_SAVE = """
import os, signal, sys, torch
from lightning_cmp.checkpoint_io import AtomicCheckpointIO

def half_then_die(obj, f, *args, **kwargs):
    f.write(b"PK half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = half_then_die
AtomicCheckpointIO().save_checkpoint({"step": 2}, sys.argv[1])
"""


@pytest.mark.timeout(120)
def test_a_save_killed_midway_leaves_a_temporary_file_the_next_save_removes(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for _ in range(2):  # two killed saves, two leftovers
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_MID_SAVE), str(path)], env=env, timeout=90)
        assert done.returncode == -signal.SIGKILL
    stale = sorted(p.name for p in tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(stale) == 2, stale
    assert io.load_checkpoint(path)["step"] == 1  # the killed saves never touched the checkpoint
    # Files that only look alike belong to others: another checkpoint's temporaries, user files.
    others = [".last.ckpt.bak.abcd1234.tmp", ".best.ckpt.abcd1234.tmp", ".last.ckpt.notes.tmp", "last.ckpt.tmp"]
    for name in others:
        (tmp_path / name).write_text("not ours")
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == sorted(["last.ckpt", *others])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
