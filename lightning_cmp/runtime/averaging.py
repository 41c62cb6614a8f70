"""Keeping the two copies of each stage in step: gradient sums and parameter averages with the mirror rank."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_cmp.runtime.comm import Comm, message_tag
from lightning_cmp.runtime.stage import StageCopy

__all__ = ["Averager", "flatten_by_dtype", "unflatten_into"]

_AVERAGE_MSG = 2  # message kind for tags (0 activations, 1 gradients)


def flatten_by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, Tensor]:
    """One flat buffer per dtype, in the order the tensors are given."""
    groups: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.dtype].append(t.reshape(-1))
    return {dtype: torch.cat(ts) for dtype, ts in groups.items()}


def unflatten_into(flats: dict[torch.dtype, Tensor], tensors: Sequence[Tensor]) -> None:
    """Copy the flat buffers made by :func:`flatten_by_dtype` back into ``tensors``."""
    offsets: dict[torch.dtype, int] = defaultdict(int)
    for t in tensors:
        start = offsets[t.dtype]
        t.copy_(flats[t.dtype][start : start + t.numel()].view_as(t))
        offsets[t.dtype] = start + t.numel()


def _grads(copy: StageCopy) -> list[Tensor]:
    """The copy's gradients, materialised as zeros where a parameter got none (e.g. an empty microbatch)."""
    for p in copy.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in copy.parameters() if p.grad is not None]


class Averager:
    """Exchanges stage copies with their mirrors; ``start`` returns at once, ``wait`` finishes everything.

    Gradient mode sums the two copies' gradients (each copy saw half of a batch whose loss is already
    normalised by the global batch, so the sum is the single-device gradient) and averages float buffers
    such as BatchNorm running statistics. Both sides compute ``a + b`` in the same order, so the copies
    stay bitwise identical.

    Example:
        >>> averager = Averager(comm, copies)  # doctest: +SKIP
        >>> averager.start_gradients(replica=0, stage=1, peer=2); averager.wait()  # doctest: +SKIP
    """

    def __init__(self, comm: Comm, copies: dict[tuple[int, int], StageCopy]) -> None:
        self.comm = comm
        self.copies = copies
        self._pending: list[tuple[list[Any], Callable[[], None]]] = []

    def start_gradients(self, replica: int, stage: int, peer: int) -> None:
        mine = self.copies[(replica, stage)]
        if peer == self.comm.me:  # both copies of the stage live here
            self._sum_local(mine, self.copies[(1 - replica, stage)])
            return
        self._exchange(stage, _grads(mine), lambda own, other: own.add_(other), peer, channel=0)
        self._exchange(stage, mine.float_buffers(), _average, peer, channel=1)

    def start_parameters(self, replica: int, stage: int, peer: int) -> None:
        mine = self.copies[(replica, stage)]
        tensors = [p.data for p in mine.parameters()] + mine.float_buffers()
        if peer == self.comm.me:
            other = self.copies[(1 - replica, stage)]
            _average_local(tensors, [p.data for p in other.parameters()] + other.float_buffers())
            return
        self._exchange(stage, tensors, _average, peer, channel=0)

    def wait(self) -> None:
        for works, finish in self._pending:
            for work in works:
                work.wait()
            finish()
        self._pending.clear()

    def _exchange(
        self, stage: int, tensors: list[Tensor], combine: Callable[[Tensor, Tensor], Any], peer: int, channel: int
    ) -> None:
        """Swap ``tensors`` with ``peer`` (one message per dtype), then ``combine(own, other)`` in place."""
        if not tensors:
            return
        flats = flatten_by_dtype(tensors)
        received: dict[torch.dtype, Tensor] = {}
        works: list[Any] = []
        for index, (dtype, flat) in enumerate(flats.items()):
            tag = message_tag(_AVERAGE_MSG, channel, stage, index)
            received[dtype], new_works = self.comm.exchange(flat, peer, tag)
            works += new_works

        def finish() -> None:
            for dtype, flat in flats.items():
                combine(flat, received[dtype])
            unflatten_into(flats, tensors)

        self._pending.append((works, finish))

    @staticmethod
    def _sum_local(a: StageCopy, b: StageCopy) -> None:
        for ga, gb in zip(_grads(a), _grads(b), strict=True):
            total = ga + gb
            ga.copy_(total)
            gb.copy_(total)
        _average_local(a.float_buffers(), b.float_buffers())


def _average(own: Tensor, other: Tensor) -> None:
    own.add_(other).div_(2)


def _average_local(mine: list[Tensor], theirs: list[Tensor]) -> None:
    for a, b in zip(mine, theirs, strict=True):
        avg = (a + b) / 2
        a.copy_(avg)
        b.copy_(avg)
