"""Point-to-point and collective messages between the ranks of one pipeline group (gloo or NCCL)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_cmp.runtime.liveness import Processes, blame, this_process

__all__ = ["Comm", "PeerLostError", "message_tag", "peers_lost"]

# Every dtype a stage may exchange; the header carries the index into this tuple.
_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
)
_MAX_DIMS = 8
_HEADER_LEN = 2 + _MAX_DIMS  # dtype index, ndim, sizes


class PeerLostError(RuntimeError):
    """A peer rank died or stopped answering; the message names it, so the failure is found on its own log."""


def peers_lost(exception: BaseException) -> bool:
    """Whether ``exception`` is, or was raised because of, a failed message or collective (a peer died or hung).

    Examples:
        >>> peers_lost(PeerLostError("rank 1 (peer of rank 0) stopped answering"))
        True
        >>> peers_lost(RuntimeError("injected failure on rank 1"))
        False
    """
    seen: set[int] = set()
    error: BaseException | None = exception
    while error is not None and id(error) not in seen:  # a callback may wrap it in an error of its own
        if isinstance(error, PeerLostError | dist.DistBackendError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def _talking_to(me: int, peers: Sequence[int], processes: Processes) -> Iterator[None]:
    """Re-raise a failed ``torch.distributed`` call naming the rank(s) that stopped answering."""
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as err:  # DistBackendError and gloo's connection errors are RuntimeErrors
        if _out_of_memory(err):  # this rank's own failure (e.g. a receive buffer), not a silent peer
            raise
        suspects = blame(me, peers, processes)
        who = f"rank {suspects[0]}" if len(suspects) == 1 else f"one of ranks {suspects}"
        raise PeerLostError(
            f"{who} (peer of rank {me}) stopped answering: {err}. That worker died, raised or hung: its own "
            "error is in its log; a hung worker is given up after CMPStrategy(timeout=...) (default 120 s)"
        ) from err


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is this process failing to allocate memory (CPU or GPU), which no peer caused.

    Examples:
        >>> _out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
        True
        >>> _out_of_memory(RuntimeError("Connection closed by peer"))
        False
    """
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


_ABANDONED: list[Any] = []  # see `Comm.abandon`
# torch 2.14 renamed the single-tensor collectives; older releases have only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def message_tag(kind: int, replica: int, stage: int, microbatch: int) -> int:
    """A tag unique per (message kind, replica, stage, microbatch) within one step (gloo matches on it); an
    asynchronous pipeline's mini-batch counter goes on past 1024, and only the few in flight need to differ."""
    return ((kind * 2 + replica) * 1024 + stage) * 1024 + microbatch % 1024


def _header(tensor: Tensor) -> Tensor:
    if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
        raise TypeError(
            f"a stage produced a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; stages may exchange tensors "
            f"of up to {_MAX_DIMS} dims with dtype in {[str(d) for d in _DTYPES]}"
        )
    head = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    head += [0] * (_HEADER_LEN - len(head))
    return torch.tensor(head, dtype=torch.int64, device=tensor.device)


def _empty_from_header(head: Tensor, device: torch.device | str) -> Tensor:
    values = head.tolist()
    dtype, ndim = _DTYPES[values[0]], values[1]
    return torch.empty(values[2 : 2 + ndim], dtype=dtype, device=device)


class Comm:
    """Messages between the ``ranks`` of one pipeline group, addressed by position in the group.

    Sends are non-blocking and remembered until `wait_sends`; receives block. A tensor's shape and
    dtype travel in a small header first, so receivers never need to know them in advance (the last batch
    of an epoch, validation batches and autocast dtypes all just work).

    Examples:
        >>> comm = Comm(ranks=[0, 1], me=0, device=torch.device("cpu"))  # doctest: +SKIP
        >>> comm.send(torch.ones(2, 3), peer=1, tag=7)  # doctest: +SKIP
    """

    def __init__(self, ranks: Sequence[int], me: int, device: torch.device, group: Any = None) -> None:
        self.ranks = list(ranks)
        self.me = me
        self.device = device
        self.group = group
        self._pending: list[tuple[Any, int]] = []  # (work, group position of the peer)
        self._keep_alive: list[Tensor] = []  # sent tensors must outlive their sends
        self.processes: Processes = {}  # filled by gather_processes: names the rank that died first

    def gather_processes(self) -> None:
        """Learn every rank's host and pid (a collective), so a failure can name the rank that died."""
        with self._with():
            self.processes = dict(zip(self.ranks, self.all_gather_object(this_process()), strict=True))

    @classmethod
    def world(cls, me: int, device: torch.device) -> Comm:
        """Every rank of the default process group, their processes already gathered (a collective).

        Call it right after the process group is set up: from then on every collective (the pipeline's and
        Lightning's barriers, broadcasts and decisions) names the rank that died or hung.
        """
        comm = cls(list(range(dist.get_world_size())), me, device)
        comm.gather_processes()
        return comm

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _with(self, peer: int | None = None) -> AbstractContextManager[None]:
        """Errors of the call inside name group position ``peer`` (or every other rank for a collective)."""
        me = self.ranks[self.me]
        peers = [self.ranks[peer]] if peer is not None else [r for r in self.ranks if r != me]
        return _talking_to(me, peers, self.processes)

    def send(self, tensor: Tensor, peer: int, tag: int) -> None:
        """Start sending ``tensor`` (header first) to group position ``peer``."""
        tensor = tensor.detach().contiguous()
        dst = self.ranks[peer]
        with self._with(peer):
            self._pending.append((dist.isend(_header(tensor), dst, group=self.group, tag=tag), peer))
            self._pending.append((dist.isend(tensor, dst, group=self.group, tag=tag), peer))
        self._keep_alive.append(tensor)

    def recv(self, peer: int, tag: int) -> Tensor:
        """Receive the next tensor sent by group position ``peer`` with ``tag``."""
        src = self.ranks[peer]
        head = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        with self._with(peer):
            dist.recv(head, src, group=self.group, tag=tag)
            out = _empty_from_header(head, self.device)
            dist.recv(out, src, group=self.group, tag=tag)
        return out

    def send_list(self, tensors: Sequence[Tensor], peer: int, tag: int) -> None:
        """Start sending a list of tensors to group position ``peer`` as two messages whatever its length: every
        tensor's dtype and shape, then all their bytes in one buffer; see `recv_list`."""
        head = [len(tensors)]
        for tensor in tensors:
            head += _header(tensor).tolist()
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        self.send(torch.tensor(head, dtype=torch.int64, device=self.device), peer, tag)
        self.send(torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=self.device), peer, tag)

    def recv_list(self, peer: int, tag: int) -> list[Tensor]:
        """Receive the next list `send_list` sent from group position ``peer`` with ``tag`` (tensors of their own,
        not views of the buffer they arrived in: autograd refuses in-place ops on views made without grad)."""
        head, data = self.recv(peer, tag).tolist(), self.recv(peer, tag)
        out, offset = [], 0
        for i in range(head[0]):
            template = _empty_from_header(torch.tensor(head[1 + i * _HEADER_LEN : 1 + (i + 1) * _HEADER_LEN]), "meta")
            size = template.numel() * template.element_size()
            out.append(data[offset : offset + size].view(template.dtype).view(template.shape).clone())
            offset += size
        return out

    def isend_into_place(self, tensors: Sequence[Tensor], peer: int, tag: int) -> None:
        """Start sending ``tensors`` to ``peer``, whose shapes and dtypes it knows (`irecv_into`); no header."""
        dst = self.ranks[peer]
        with self._with(peer):
            for tensor in tensors:
                tensor = tensor.detach().contiguous()
                self._pending.append((dist.isend(tensor, dst, group=self.group, tag=tag), peer))
                self._keep_alive.append(tensor)

    def irecv_into(self, tensors: Sequence[Tensor], peer: int, tag: int) -> list[Any]:
        """Start receiving what `isend_into_place` sends, in place into ``tensors`` (contiguous); wait on the works
        returned with `wait`."""
        src = self.ranks[peer]
        with self._with(peer):
            return [dist.irecv(t.detach(), src, group=self.group, tag=tag) for t in tensors]

    def exchange_into(self, tensor: Tensor, out: Tensor, peer: int, tag: int) -> list[Any]:
        """Start sending ``tensor`` to ``peer`` while receiving its same-shaped tensor into ``out``."""
        dst = self.ranks[peer]
        with self._with(peer):
            return [dist.isend(tensor, dst, group=self.group, tag=tag), dist.irecv(out, dst, group=self.group, tag=tag)]

    def wait(self, works: Sequence[Any], peer: int | None) -> None:
        """Wait for ``works`` exchanged with group position ``peer`` (None: a collective over the group)."""
        with self._with(peer):
            for work in works:
                work.wait()

    def broadcast(self, tensor: Tensor | None, src: int) -> Tensor:
        """Every rank gets ``tensor`` from group position ``src`` (``tensor`` is ignored elsewhere)."""
        root = self.ranks[src]
        if src == self.me:
            assert tensor is not None
            tensor = tensor.detach().contiguous()
            with self._with():
                dist.broadcast(_header(tensor), root, group=self.group)
                dist.broadcast(tensor, root, group=self.group)
            return tensor
        head = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        with self._with():
            dist.broadcast(head, root, group=self.group)
            out = _empty_from_header(head, self.device)
            dist.broadcast(out, root, group=self.group)
        return out

    def start_all_reduce(self, tensor: Tensor) -> list[Any]:
        """Start summing ``tensor`` in place over the group; wait on the works returned with `wait` (peer None)."""
        with self._with():
            return [dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)]

    def start_reduce_scatter(self, out: Tensor, tensor: Tensor) -> list[Any]:
        """Start summing ``tensor`` over the group, group position ``i`` receiving slice ``i`` into ``out``."""
        with self._with():
            return [_reduce_scatter(out, tensor, group=self.group, async_op=True)]

    def start_all_gather(self, out: Tensor, tensor: Tensor) -> list[Any]:
        """Start gathering every position's ``tensor`` into ``out``, position ``i`` at slice ``i``."""
        with self._with():
            return [_all_gather(out, tensor, group=self.group, async_op=True)]

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce(self, tensor: Tensor, op: Any) -> Tensor:
        """Reduce ``tensor`` in place over the group with ``op`` (a ``torch.distributed.ReduceOp``)."""
        if self.size > 1:
            with self._with():
                dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            with self._with():
                dist.barrier(group=self.group)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's same-shaped ``tensor``, by group position."""
        if self.size == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        with self._with():
            dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        with self._with():
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if self.size == 1:
            return obj
        box = [obj]
        with self._with():
            dist.broadcast_object_list(box, self.ranks[src], group=self.group)
        return box[0]

    @staticmethod
    def abandon(*in_flight: Any) -> None:
        """Keep messages given up after a failure (their works and buffers) alive for the life of the process:
        a gloo send or receive freed mid-flight can break the connection for the collectives that follow."""
        _ABANDONED.append(in_flight)

    def abandon_sends(self) -> None:
        """Stop tracking the sends in flight without waiting for them (after a failure); see `abandon`."""
        self.abandon(self._pending, self._keep_alive)
        self._pending, self._keep_alive = [], []

    def wait_sends(self) -> None:
        """Block until every send started since the last call has completed."""
        for work, peer in self._pending:
            with self._with(peer):
                work.wait()
        self._pending.clear()
        self._keep_alive.clear()
