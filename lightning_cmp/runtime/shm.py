"""Shared memory between the CPU ranks of one host: mirror exchanges without copying through TCP sockets.

gloo has no shared-memory transport: a 45 MB gradient exchange over loopback TCP costs each rank ~20 ms of
a core in kernel copies, competing with the backward it is meant to overlap. Ranks that see the same
``/dev/shm`` instead map each other's regions: the sender copies its tensors into its own region once and
the receiver combines straight out of the sender's. Only tiny ready/ack messages still go through gloo, so
a dead peer is detected exactly as before.

Files are named after a token shared by the job; whoever maps a peer's file first removes its name, so
nothing is left in ``/dev/shm`` once both sides have mapped it (a crash before that leaves at most the
files of the first exchange, which `SharedRegions.close` removes on a normal exit).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import torch
from torch import Tensor

from lightning_cmp.runtime.comm import _DTYPES, Comm

__all__ = ["SHM_DIR", "SharedRegions", "shared_memory_peers"]

#: Where regions live; ``LIGHTNING_CMP_SHM=0`` in the environment turns the shared-memory path off.
SHM_DIR = Path("/dev/shm")
_ENV = "LIGHTNING_CMP_SHM"


class SharedRegions:
    """This rank's regions (created on first use) and its peers' (mapped on first use), by name.

    Examples:
        >>> regions = SharedRegions(Path("/dev/shm"), token="ab12", me=0)  # doctest: +SKIP
        >>> mine = regions.mine("s0c1", torch.float32, 1024)  # doctest: +SKIP
        >>> theirs = regions.theirs(1, "s0c1", torch.float32, 1024)  # on rank 0: rank 1's region  # doctest: +SKIP
    """

    def __init__(self, directory: Path, token: str, me: int) -> None:
        self.directory = directory
        self.token = token
        self.me = me
        self._mine: dict[tuple[str, torch.dtype, int], Tensor] = {}
        self._theirs: dict[tuple[int, str, torch.dtype, int], Tensor] = {}
        self._created: list[Path] = []

    def _path(self, rank: int, name: str, dtype: torch.dtype, numel: int) -> Path:
        return self.directory / f"lightning_cmp-{self.token}-r{rank}-{name}-{_DTYPES.index(dtype)}-{numel}"

    def mine(self, name: str, dtype: torch.dtype, numel: int) -> Tensor:
        """This rank's region ``name``: a flat tensor that peers on this host can map."""
        key = (name, dtype, numel)
        if key not in self._mine:
            path = self._path(self.me, name, dtype, numel)
            nbytes = max(1, numel * torch.empty((), dtype=dtype).element_size())
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self._created.append(path)
            try:
                # Reserve the pages now: a full /dev/shm then fails here with ENOSPC instead of a SIGBUS later.
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as err:
                raise RuntimeError(
                    f"cannot reserve {nbytes / 2**20:.1f} MiB in {self.directory} for the exchange with the mirror "
                    f"rank ({err}); free space there or set {_ENV}=0 to exchange through the process group"
                ) from err
            finally:
                os.close(fd)
            self._mine[key] = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        return self._mine[key]

    def theirs(self, peer: int, name: str, dtype: torch.dtype, numel: int) -> Tensor:
        """Rank ``peer``'s region ``name``, mapped read-write; its file name is removed once mapped."""
        key = (peer, name, dtype, numel)
        if key not in self._theirs:
            path = self._path(peer, name, dtype, numel)
            self._theirs[key] = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return self._theirs[key]

    def close(self) -> None:
        """Remove the names of this rank's files that no peer mapped (the mappings stay valid)."""
        for path in self._created:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._created.clear()


def shared_memory_peers(comm: Comm, needed_bytes: int, directory: Path = SHM_DIR) -> tuple[SharedRegions, set[int]]:
    """Which group positions this rank can exchange with through ``directory`` (a collective).

    A pair qualifies when both ranks are on the CPU, each can read a probe file the other wrote (so they
    share the directory, whatever the host names say) and each has ``2 * needed_bytes`` free there.

    Examples:
        >>> regions, peers = shared_memory_peers(comm, needed_bytes=45 << 20)  # doctest: +SKIP
        >>> peers  # on rank 0 of two ranks on one host  # doctest: +SKIP
        {1}
    """
    token = comm.broadcast_object(secrets.token_hex(8), 0)
    regions = SharedRegions(directory, token, comm.ranks[comm.me])
    usable = comm.device.type == "cpu" and os.environ.get(_ENV, "1") != "0" and _has_room(directory, needed_bytes)
    probe = directory / f"lightning_cmp-{token}-probe-{comm.me}"
    if usable:
        try:
            probe.write_text(token)
        except OSError:
            usable = False
    try:
        writers = comm.all_gather_object(usable)  # also a barrier: every probe is written before any is read
        seen = _readable_probes(directory, token, [p for p, wrote in enumerate(writers) if wrote]) if usable else set()
        everyone = comm.all_gather_object(seen)  # and every probe is read before any is removed
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    peers = {p for p in everyone[comm.me] if p != comm.me and comm.me in everyone[p]}
    return regions, peers


def _has_room(directory: Path, needed_bytes: int) -> bool:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return hasattr(os, "posix_fallocate") and stat.f_bavail * stat.f_frsize >= 2 * needed_bytes


def _readable_probes(directory: Path, token: str, positions: list[int]) -> set[int]:
    seen = set()
    for position in positions:
        with contextlib.suppress(OSError):
            if (directory / f"lightning_cmp-{token}-probe-{position}").read_text() == token:
                seen.add(position)
    return seen
