"""Checkpoint files that are either the old one or the new one: written aside, synced, then renamed."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file next to ``path``, ``fsync`` it, then ``os.replace`` it over ``path``;
    loads map the file (``torch.load(mmap=True)``) instead of reading it whole.

    A crash or an error while saving leaves the previous ``last.ckpt`` in place, never a truncated file;
    the rename is atomic on POSIX and Windows when both names are on one file system (hence the same folder).
    A process killed while saving leaves its temporary file (``.last.ckpt.<8 characters>.tmp``) behind; the
    next successful save of that checkpoint removes it. Remote paths (``s3://``...) fall back to Lightning's
    own writer and reader.

    Loading maps the file (``torch.load(mmap=True)``) instead of reading it: a worker of a split model touches
    only the bytes of the stages it restores, so none holds the whole checkpoint. Files in torch's legacy
    (pre-1.6) format are read whole.

    Examples:
        >>> io = AtomicCheckpointIO()
        >>> io.save_checkpoint({"step": 1}, "/tmp/run/last.ckpt")  # doctest: +SKIP
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        return self.save_streamed(path, lambda f, _: torch.save(checkpoint, f))

    def save_streamed(
        self, path: _PATH, write: Callable[[BinaryIO, str], None], storage_options: Any | None = None
    ) -> None:
        """Atomically replace ``path`` with what ``write(file, temporary_name)`` writes (the file is seekable)."""
        if storage_options is not None or not _is_local(path):
            raise ValueError(
                f"{path}: checkpoints written stage by stage (CMPStrategy(keep_split=True)) go to a local file; use a "
                "local dirpath, or keep_split=False to have rank 0 gather and write through Lightning's writer"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the usual permissions
            with os.fdopen(fd, "wb") as f:
                write(f, tmp)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        _remove_stale_temporaries(target)
        return None


    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local(path) or not Path(path).is_file() or not zipfile.is_zipfile(path):
            return super().load_checkpoint(path, map_location, weights_only)
        loaded: dict[str, Any] = torch.load(str(path), map_location=map_location, weights_only=weights_only, mmap=True)
        return loaded


def _remove_stale_temporaries(target: Path) -> None:
    """Delete what killed saves of ``target`` left: only names ``mkstemp`` gave them (``.<name>.<8 chars>.tmp``)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if pattern.fullmatch(path.name):
            with contextlib.suppress(OSError):  # gone already, or not ours to delete
                path.unlink()


def _is_local(path: _PATH) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
