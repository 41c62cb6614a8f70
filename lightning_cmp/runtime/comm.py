"""Point-to-point and collective messages between the ranks of one pipeline group (gloo or NCCL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "message_tag"]

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


def message_tag(kind: int, replica: int, stage: int, microbatch: int) -> int:
    """A tag unique per (message kind, replica, stage, microbatch) within one step (gloo matches on it)."""
    return ((kind * 2 + replica) * 1024 + stage) * 1024 + microbatch


def _header(tensor: Tensor) -> Tensor:
    if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
        raise TypeError(
            f"a stage produced a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; stages may exchange tensors "
            f"of up to {_MAX_DIMS} dims with dtype in {[str(d) for d in _DTYPES]}"
        )
    head = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    head += [0] * (_HEADER_LEN - len(head))
    return torch.tensor(head, dtype=torch.int64, device=tensor.device)


def _empty_from_header(head: Tensor, device: torch.device) -> Tensor:
    values = head.tolist()
    dtype, ndim = _DTYPES[values[0]], values[1]
    return torch.empty(values[2 : 2 + ndim], dtype=dtype, device=device)


class Comm:
    """Messages between the ``ranks`` of one pipeline group, addressed by position in the group.

    Sends are non-blocking and remembered until :meth:`wait_sends`; receives block. A tensor's shape and
    dtype travel in a small header first, so receivers never need to know them in advance (the last batch
    of an epoch, validation batches and autocast dtypes all just work).

    Example:
        >>> comm = Comm(ranks=[0, 1], me=0, device=torch.device("cpu"))  # doctest: +SKIP
        >>> comm.send(torch.ones(2, 3), peer=1, tag=7)  # doctest: +SKIP
    """

    def __init__(self, ranks: Sequence[int], me: int, device: torch.device, group: Any = None) -> None:
        self.ranks = list(ranks)
        self.me = me
        self.device = device
        self.group = group
        self._pending: list[Any] = []
        self._keep_alive: list[Tensor] = []  # sent tensors must outlive their sends

    @property
    def size(self) -> int:
        return len(self.ranks)

    def send(self, tensor: Tensor, peer: int, tag: int) -> None:
        """Start sending ``tensor`` (header first) to group position ``peer``."""
        tensor = tensor.detach().contiguous()
        dst = self.ranks[peer]
        self._pending.append(dist.isend(_header(tensor), dst, group=self.group, tag=tag))
        self._pending.append(dist.isend(tensor, dst, group=self.group, tag=tag))
        self._keep_alive.append(tensor)

    def recv(self, peer: int, tag: int) -> Tensor:
        """Receive the next tensor sent by group position ``peer`` with ``tag``."""
        src = self.ranks[peer]
        head = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(head, src, group=self.group, tag=tag)
        out = _empty_from_header(head, self.device)
        dist.recv(out, src, group=self.group, tag=tag)
        return out

    def exchange_into(self, tensor: Tensor, out: Tensor, peer: int, tag: int) -> list[Any]:
        """Start sending ``tensor`` to ``peer`` while receiving its same-shaped tensor into ``out``."""
        dst = self.ranks[peer]
        return [dist.isend(tensor, dst, group=self.group, tag=tag), dist.irecv(out, dst, group=self.group, tag=tag)]

    def broadcast(self, tensor: Tensor | None, src: int) -> Tensor:
        """Every rank gets ``tensor`` from group position ``src`` (``tensor`` is ignored elsewhere)."""
        root = self.ranks[src]
        if src == self.me:
            assert tensor is not None
            tensor = tensor.detach().contiguous()
            dist.broadcast(_header(tensor), root, group=self.group)
            dist.broadcast(tensor, root, group=self.group)
            return tensor
        head = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.broadcast(head, root, group=self.group)
        out = _empty_from_header(head, self.device)
        dist.broadcast(out, root, group=self.group)
        return out

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's same-shaped ``tensor``, by group position."""
        if self.size == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, self.ranks[src], group=self.group)
        return box[0]

    def wait_sends(self) -> None:
        """Block until every send started since the last call has completed."""
        for work in self._pending:
            work.wait()
        self._pending.clear()
        self._keep_alive.clear()
