"""Keeping the two copies of each stage in step: gradient sums and parameter averages with the mirror rank."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_cmp.runtime.comm import _DTYPES, Comm, message_tag
from lightning_cmp.runtime.shm import SharedRegions, shared_memory_peers
from lightning_cmp.runtime.stage import StageCopy

if TYPE_CHECKING:
    from lightning_cmp.runtime.groups import DataGroups
    from lightning_cmp.runtime.sharded import Shards

__all__ = ["Averager", "flat_sizes", "flat_views", "flatten_into", "unflatten_into"]

#: ``combine(own, other, out)``: what an exchange leaves in ``out`` (one of the exchanged tensors).
Combine = Callable[[Tensor, Tensor, Tensor], Any]

_AVERAGE_MSG = 2  # message kinds for tags (0 activations, 1 gradients)
_READY_MSG = 3  # shared memory: "my region holds this exchange's tensors"
_ACK_MSG = 4  # shared memory: "I have read your region; you may write it again"
_BUCKET_BYTES = 16 << 20
_MAX_BUCKETS = 100  # channel * 8 + dtype index must stay below the 1024 tags of a stage


def flat_sizes(tensors: Sequence[Tensor]) -> dict[torch.dtype, int]:
    """Elements per dtype when ``tensors`` are laid end to end, one flat buffer per dtype."""
    sizes: dict[torch.dtype, int] = defaultdict(int)
    for t in tensors:
        sizes[t.dtype] += t.numel()
    return dict(sizes)


def flat_views(flats: dict[torch.dtype, Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """For each of ``tensors``, the slice of its dtype's flat buffer that holds it, shaped like it."""
    offsets: dict[torch.dtype, int] = defaultdict(int)
    views = []
    for t in tensors:
        start = offsets[t.dtype]
        views.append(flats[t.dtype][start : start + t.numel()].view_as(t))
        offsets[t.dtype] = start + t.numel()
    return views


def unflatten_into(flats: dict[torch.dtype, Tensor], tensors: Sequence[Tensor]) -> None:
    """Copy flat per-dtype buffers (``tensors`` laid end to end in order) back into ``tensors``."""
    for t, view in zip(tensors, flat_views(flats, tensors), strict=True):
        t.copy_(view)


def flatten_into(tensors: Sequence[Tensor], flats: dict[torch.dtype, Tensor]) -> None:
    """Copy ``tensors`` end to end into their dtype's flat buffer (the inverse of `unflatten_into`)."""
    for t, view in zip(tensors, flat_views(flats, tensors), strict=True):
        view.copy_(t)


def _zero_filled(params: Sequence[nn.Parameter]) -> list[Tensor]:
    """The gradients, materialised as zeros where a parameter got none (e.g. an empty microbatch)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None]


def _drop_unused(params: Sequence[nn.Parameter], had: Tensor) -> None:
    """Give back ``None`` gradients where neither copy got one (``had`` summed over both): one device would
    have none either, and the optimizer must not move such a parameter (momentum, weight decay)."""
    for p, used in zip(params, had.tolist(), strict=True):
        if not used:
            p.grad = None


@dataclass
class _Bucket:
    """Parameters whose gradients travel together, in the order backward produces them."""

    params: list[nn.Parameter]
    ready: int = 0
    started: bool = False

    @property
    def complete(self) -> bool:
        return self.ready >= len(self.params)


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    buckets, current, size = [], [], 0
    for p in reversed(params):  # backward produces the last layers' gradients first
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(_Bucket(current))
            current, size = [], 0
    if current:
        buckets.append(_Bucket(current))
    return buckets


class Averager:
    """Exchanges stage copies with their mirrors; ``start`` returns at once, ``wait`` finishes everything.

    Gradient mode sums the two copies' gradients (each copy saw half of a batch whose loss is already
    normalised by the global batch, so the sum is the single-device gradient) and averages float buffers
    such as BatchNorm running statistics. Both sides compute ``a + b``, so the copies stay bitwise identical.

    Once a copy is `arm`-ed (just before its last backward of the step), its gradients are sent in
    buckets of about ``bucket_bytes`` as soon as backward has produced them (a post-accumulate-grad hook), so
    the exchange overlaps the rest of that backward; `start_gradients` sends what is left.

    A mirror on the same host (CPU) is reached through shared memory (`lightning_cmp.runtime.shm`)
    unless ``shared_memory=False``; other mirrors through the process group (gloo or NCCL point-to-point).

    With ``data`` (several pipelines training data-parallel, `lightning_cmp.runtime.groups`), every exchange is
    instead an all-reduce over the stage's averaging group (every copy of the stage in every pipeline; a rank
    holding both copies of a stage combines them first): gradients are summed and divided by the number of
    pipelines (each pipeline's pair already sums to its own batch's gradient), weights and buffers averaged over
    the copies. The group's members start the buckets of one stage in the same order (a collective's order is
    its identity), as soon as backward has completed them.

    Examples:
        >>> averager = Averager(comm, copies)  # doctest: +SKIP
        >>> averager.arm(0, 1, peer=2); ...; averager.start_gradients(0, 1, peer=2); averager.wait()  # doctest: +SKIP
    """

    def __init__(
        self,
        comm: Comm,
        copies: dict[tuple[int, int], StageCopy],
        bucket_bytes: int | None = None,
        shared_memory: bool = True,
        data: DataGroups | None = None,
    ) -> None:
        self.comm = comm
        self.copies = copies
        self.data = data
        #: Lee et al.'s sharded form (`lightning_cmp.runtime.sharded`): it takes over the copies' gradients
        self.shards: Shards | None = None
        self._next_bucket: dict[tuple[int, int], int] = {}  # data groups: the next bucket to start, in order
        self._regions: SharedRegions | None = None
        self.shared_peers: set[int] = set()  # group positions reached through shared memory
        if shared_memory:  # a collective: every rank of the group must pass the same flag
            state = [t for c in copies.values() for t in c.module.state_dict().values()]
            state_bytes = sum(t.numel() * t.element_size() for t in state)
            self._regions, self.shared_peers = shared_memory_peers(comm, state_bytes)
        self._tiny: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}  # (kind, stage, channel) -> buffers
        self._acks: dict[tuple[int, int], tuple[list[Any], int]] = {}  # (stage, channel) -> (works, peer)
        # (works, the Comm they run on, peer position or None for a collective, finish)
        self._pending: list[tuple[list[Any], Comm, int | None, Callable[[], None]]] = []
        self._buckets: dict[tuple[int, int], list[_Bucket]] = {}
        self._where: dict[int, tuple[tuple[int, int], int]] = {}
        self._armed: dict[tuple[int, int], int] = {}
        self._hooks: list[Any] = []
        self._flats: dict[tuple[int, int], dict[torch.dtype, tuple[Tensor, Tensor]]] = {}
        self._group_flats: dict[tuple[int, int], dict[torch.dtype, Tensor]] = {}
        for key, copy in copies.items():
            params = copy.parameters()
            total = sum(p.numel() * p.element_size() for p in params)
            self._buckets[key] = _buckets(params, max(bucket_bytes or _BUCKET_BYTES, total // _MAX_BUCKETS + 1))
            for index, bucket in enumerate(self._buckets[key]):
                for p in bucket.params:
                    self._where[id(p)] = (key, index)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def close(self, drain: bool = True) -> None:
        """Remove the gradient hooks from the parameters and this rank's shared-memory file names.

        With ``drain`` (a normal end), exchanges and acknowledgements still in flight are waited for first: a
        gloo send or receive whose buffers are freed while it is pending can leave the connection to the peer
        unusable, and the next collective on it (a new pipeline's set-up, Lightning's barriers) then hangs.
        After a failure (``drain=False``) nothing is waited for (the peer may be gone), and what is in flight is
        kept alive for the life of the process instead of freed.
        """
        if self.shards is not None:
            self.shards.close(drain)
        if drain:
            self.wait()
            for works, peer in self._acks.values():
                self.comm.wait(works, peer)
        else:
            self.comm.abandon(self._acks.copy(), self._pending.copy(), self._tiny, self._flats, self._group_flats)
        self._acks.clear()
        self._pending.clear()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._regions is not None:
            self._regions.close()

    def _local_pair(self, replica: int, stage: int) -> bool:
        return (1 - replica, stage) in self.copies

    def _grouped(self, stage: int) -> bool:
        return self.data is not None and stage in self.data.stages

    def arm(self, replica: int, stage: int, peer: int) -> None:
        """From now on, send this copy's gradient buckets to ``peer`` as soon as they are complete."""
        if self._local_pair(replica, stage) or (peer == self.comm.me and not self._grouped(stage)):
            return  # both copies here: combined once both backwards are done
        if self.shards is not None:
            self.shards.arm((replica, stage))
            return
        self._armed[(replica, stage)] = peer
        self._next_bucket[(replica, stage)] = 0
        for bucket in self._buckets[(replica, stage)]:
            bucket.ready, bucket.started = 0, False

    def _on_grad(self, p: Tensor) -> None:
        key, index = self._where[id(p)]
        if key not in self._armed:
            return
        bucket = self._buckets[key][index]
        bucket.ready += 1
        if not self._grouped(key[1]):
            if bucket.complete and not bucket.started:
                self._start_bucket(key, index)
            return
        buckets, start = self._buckets[key], self._next_bucket[key]
        while start < len(buckets) and buckets[start].complete:  # a collective: every member in the same order
            self._start_bucket(key, start)
            start += 1
        self._next_bucket[key] = start

    def _start_bucket(self, key: tuple[int, int], index: int) -> None:
        """Send one bucket: its gradients (zeros where none) and which parameters got one, summed alike."""
        bucket = self._buckets[key][index]
        bucket.started = True
        flags = [float(p.grad is not None) for p in bucket.params]
        had = torch.tensor(flags, device=bucket.params[0].device)
        grads = _zero_filled(bucket.params)
        after = functools.partial(_drop_unused, bucket.params, had) if not all(flags) else None
        self._exchange(key[1], [*grads, had], _add, self._armed[key], channel=index + 1, after=after)

    def start_gradients(self, replica: int, stage: int, peer: int) -> None:
        """Sum this copy's gradients with its mirror's (the buckets not sent yet go now)."""
        mine = self.copies[(replica, stage)]
        if self.shards is not None:
            self._start_sharded(replica, stage, peer)
            return
        if self._local_pair(replica, stage):  # both copies of the stage live here
            self._sum_local(mine, self.copies[(1 - replica, stage)])
            if self._grouped(stage):
                self._exchange_pair(replica, stage, [p.grad for p in mine.parameters()], gradients=True)
            return
        if peer == self.comm.me and not self._grouped(stage):
            return  # a single copy and no other pipeline: nothing to average
        key = (replica, stage)
        if key not in self._armed:
            self.arm(replica, stage, peer)
        for index, bucket in enumerate(self._buckets[key]):
            if not bucket.started:
                self._start_bucket(key, index)
        del self._armed[key]
        self._exchange(stage, mine.float_buffers(), _average, peer, channel=0)

    def _start_sharded(self, replica: int, stage: int, peer: int) -> None:
        """Sharded form: the gradients go through the shards' reduce-scatter, buffers are averaged as usual."""
        assert self.shards is not None and self.data is not None
        mine = self.copies[(replica, stage)]
        pair = self._local_pair(replica, stage)
        self.shards.start((replica, stage) if (replica, stage) in self.shards.copies else (1 - replica, stage))
        buffers = mine.float_buffers()
        if not pair:
            self._exchange(stage, buffers, _average, peer, channel=0)
            return
        other = self.copies[(1 - replica, stage)].float_buffers()
        _average_local(buffers, other)

        def copy_over() -> None:
            for b, c in zip(buffers, other, strict=True):
                c.copy_(b)

        self._exchange_group(stage, buffers, self.data.num_groups, channel=0, after=copy_over)

    def start_parameters(self, replica: int, stage: int, peer: int) -> None:
        mine = self.copies[(replica, stage)]
        tensors = [p.data for p in mine.parameters()] + mine.float_buffers()
        if self._local_pair(replica, stage):
            other = self.copies[(1 - replica, stage)]
            _average_local(tensors, [p.data for p in other.parameters()] + other.float_buffers())
            if self._grouped(stage):
                self._exchange_pair(replica, stage, [p.data for p in mine.parameters()], gradients=False)
            return
        if peer == self.comm.me and not self._grouped(stage):
            return
        self._exchange(stage, tensors, _average, peer, channel=0)

    def _exchange_pair(self, replica: int, stage: int, tensors: list[Tensor | None], gradients: bool) -> None:
        """Both copies of ``stage`` live here and are combined already (``tensors``: the first copy's gradients
        or weights): combine them with the other pipelines' pairs, then copy the result into the second copy."""
        mine, other = self.copies[(replica, stage)], self.copies[(1 - replica, stage)]
        params, twins = mine.parameters(), other.parameters()
        flags = torch.tensor([float(t is not None) for t in tensors], device=self.comm.device)
        if gradients:
            values = _zero_filled(params)
        else:
            values = [t for t in tensors if t is not None]
        buffers = mine.float_buffers()

        def copy_over() -> None:
            for p, q, used in zip(params, twins, flags.tolist(), strict=True):
                if not gradients:
                    q.data.copy_(p.data)
                elif not used:  # no copy in any pipeline got a gradient: leave the parameter alone
                    p.grad = q.grad = None
                else:
                    assert p.grad is not None
                    q.grad = p.grad.clone() if q.grad is None else q.grad.copy_(p.grad)
            for b, c in zip(buffers, other.float_buffers(), strict=True):
                c.copy_(b)

        assert self.data is not None
        divisor = self.data.num_groups  # each pipeline contributes one combined pair
        tensors_out = [*values, flags, *buffers] if gradients else [*values, *buffers]
        self._exchange_group(stage, tensors_out, divisor, channel=0, after=copy_over)

    def wait(self) -> None:
        for works, comm, peer, finish in self._pending:
            comm.wait(works, peer)
            finish()
        self._pending.clear()
        if self.shards is not None:
            self.shards.wait()

    def _exchange(
        self,
        stage: int,
        tensors: list[Tensor],
        combine: Combine,
        peer: int,
        channel: int,
        after: Callable[[], None] | None = None,
    ) -> None:
        """Swap ``tensors`` with ``peer``, then set each to ``combine(own, other)`` and call ``after``; finished
        by `wait`."""
        if not tensors:
            return
        if self._grouped(stage):
            assert self.data is not None
            # gradients: each pipeline's pair sums to its own batch's gradient, averaged over the pipelines;
            # weights and buffers: averaged over every copy
            divisor = self.data.num_groups if combine is _add else self.data.stages[stage].size
            self._exchange_group(stage, tensors, divisor, channel, after)
            return
        if peer in self.shared_peers:
            self._exchange_shared(stage, tensors, combine, peer, channel)
        else:
            self._exchange_messages(stage, tensors, combine, peer, channel)
        if after is not None:
            works, comm, position, finish = self._pending[-1]
            self._pending[-1] = (works, comm, position, _then(finish, after))

    def _exchange_group(
        self,
        stage: int,
        tensors: list[Tensor],
        divisor: int,
        channel: int,
        after: Callable[[], None] | None = None,
    ) -> None:
        """All-reduce ``tensors`` over ``stage``'s averaging group (one message per dtype, buffers kept from step
        to step), then divide the floating-point ones by ``divisor`` and call ``after``; finished by `wait`."""
        assert self.data is not None
        comm = self.data.stages[stage]
        key = (stage, channel)
        sizes = flat_sizes(tensors)
        flats = self._group_flats.get(key)
        if flats is None or {d: t.numel() for d, t in flats.items()} != sizes:
            flats = {d: torch.empty(n, dtype=d, device=tensors[0].device) for d, n in sizes.items()}
            self._group_flats[key] = flats
        flatten_into(tensors, flats)
        works = [w for flat in flats.values() for w in comm.start_all_reduce(flat)]

        def finish() -> None:
            for flat in flats.values():
                if flat.is_floating_point():
                    flat.div_(divisor)
            unflatten_into(flats, tensors)
            if after is not None:
                after()

        self._pending.append((works, comm, None, finish))

    def _exchange_messages(self, stage: int, tensors: list[Tensor], combine: Combine, peer: int, channel: int) -> None:
        """Through the process group, one message per dtype.

        The flat send and receive buffers are kept from step to step: fresh multi-megabyte buffers would be
        mapped and page-faulted anew every step.
        """
        flats = self._flat_buffers((stage, channel), tensors)
        works: list[Any] = []
        for index, (send, recv) in enumerate(flats.values()):
            tag = message_tag(_AVERAGE_MSG, 0, stage, channel * len(_DTYPES) + index)
            works += self.comm.exchange_into(send, recv, peer, tag)

        def finish() -> None:
            for send, recv in flats.values():
                combine(send, recv, send)
            unflatten_into({dtype: send for dtype, (send, _) in flats.items()}, tensors)

        self._pending.append((works, self.comm, peer, finish))

    def _exchange_shared(self, stage: int, tensors: list[Tensor], combine: Combine, peer: int, channel: int) -> None:
        """Through shared memory: copy into this rank's region, signal, then combine out of the peer's.

        Neither side writes a region the other may still be reading: a rank writes its region again only
        after the peer acknowledged reading the previous contents.
        """
        assert self._regions is not None
        link = (stage, channel)
        if link in self._acks:
            self.comm.wait(*self._acks.pop(link))
        name, sizes = f"s{stage}c{channel}", flat_sizes(tensors)
        mine = {dtype: self._regions.mine(name, dtype, n) for dtype, n in sizes.items()}
        flatten_into(tensors, mine)
        ready = self._signal(_READY_MSG, stage, channel, peer)

        def finish() -> None:
            assert self._regions is not None
            theirs = {dtype: self._regions.theirs(self.comm.ranks[peer], name, dtype, n) for dtype, n in sizes.items()}
            for t, own, other in zip(tensors, flat_views(mine, tensors), flat_views(theirs, tensors), strict=True):
                combine(own, other, t)
            self._acks[link] = (self._signal(_ACK_MSG, stage, channel, peer), peer)

        self._pending.append((ready, self.comm, peer, finish))

    def _signal(self, kind: int, stage: int, channel: int, peer: int) -> list[Any]:
        """Exchange a one-element message with ``peer`` (kept buffers: each is waited on before its reuse)."""
        key = (kind, stage, channel)
        if key not in self._tiny:
            self._tiny[key] = (torch.zeros(1, device=self.comm.device), torch.zeros(1, device=self.comm.device))
        send, recv = self._tiny[key]
        return self.comm.exchange_into(send, recv, peer, message_tag(kind, 0, stage, channel))

    def _flat_buffers(self, key: tuple[int, int], tensors: list[Tensor]) -> dict[torch.dtype, tuple[Tensor, Tensor]]:
        """Persistent (send, receive) buffers per dtype for ``key``, with ``tensors`` copied into the send one."""
        sizes = flat_sizes(tensors)
        cached = self._flats.get(key)
        if cached is None or {d: s.numel() for d, (s, _) in cached.items()} != sizes:
            device = tensors[0].device
            cached = {
                d: (torch.empty(n, dtype=d, device=device), torch.empty(n, dtype=d, device=device))
                for d, n in sizes.items()
            }
            self._flats[key] = cached
        flatten_into(tensors, {d: send for d, (send, _) in cached.items()})
        return cached

    @staticmethod
    def _sum_local(a: StageCopy, b: StageCopy) -> None:
        pa, pb = a.parameters(), b.parameters()
        unused = [x.grad is None and y.grad is None for x, y in zip(pa, pb, strict=True)]
        for ga, gb in zip(_zero_filled(pa), _zero_filled(pb), strict=True):
            total = ga + gb
            ga.copy_(total)
            gb.copy_(total)
        for x, y, none in zip(pa, pb, unused, strict=True):
            if none:  # neither copy got a gradient: as on one device, the optimizer must leave it alone
                x.grad = y.grad = None
        _average_local(a.float_buffers(), b.float_buffers())


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


# own + other is computed on both sides: IEEE addition is commutative, so the two copies stay bitwise equal.
def _add(own: Tensor, other: Tensor, out: Tensor) -> None:
    torch.add(own, other, out=out)


def _average(own: Tensor, other: Tensor, out: Tensor) -> None:
    torch.add(own, other, out=out).div_(2)


def _average_local(mine: list[Tensor], theirs: list[Tensor]) -> None:
    for a, b in zip(mine, theirs, strict=True):
        avg = (a + b) / 2
        a.copy_(avg)
        b.copy_(avg)
