"""Structural checks of timetables and lowered programs; failures show the grid with the bad cell marked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule.action import Action, Cell, Kind
from lightning_cmp.schedule.lower import output_actions
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.render import render, render_program

__all__ = ["validate"]

Streams = Mapping[int, Sequence[Action | None]]
_PEER_KIND = {Kind.SEND_ACT: Kind.RECV_ACT, Kind.RECV_ACT: Kind.SEND_ACT}
_PEER_KIND |= {Kind.SEND_GRAD: Kind.RECV_GRAD, Kind.RECV_GRAD: Kind.SEND_GRAD}


class _Checker:
    """One validation run: the streams, where each action sits, and how to fail with the grid."""

    def __init__(
        self, streams: Streams, placement: Placement, num_microbatches: int, loss_barrier: bool | None
    ) -> None:
        self.streams, self.placement, self.num_microbatches = streams, placement, num_microbatches
        self.is_program = any(a is not None and not a.kind.is_compute for s in streams.values() for a in s)
        self.cells = [(r, i, a) for r, s in sorted(streams.items()) for i, a in enumerate(s) if a is not None]
        has_losses = any(a.kind is Kind.LOSS for _, _, a in self.cells)
        self.barrier = (not has_losses if self.is_program else True) if loss_barrier is None else loss_barrier

    def fail(self, message: str, cell: Cell | None = None) -> ScheduleError:
        grid = render_program(self.streams, cell) if self.is_program else render(self.streams, cell)
        return ScheduleError(f"{message}\n{grid}")

    def where(self, action: Action, rank: int, index: int) -> str:
        return f"{action} at rank {rank}, {'step' if self.is_program else 'slot'} {index}"

    def check_fields(self) -> None:
        p, m = self.placement, self.num_microbatches
        for rank, i, a in self.cells:
            if a.kind is not Kind.WAIT_AVERAGE and not (
                0 <= a.replica < p.num_replicas and 0 <= a.stage < p.num_stages and 0 <= a.microbatch < m
            ):
                raise self.fail(f"{self.where(a, rank, i)} is outside {p} with num_microbatches={m}", (rank, i))
            if a.kind in _PEER_KIND and _link(a, p) is None:
                message = f"{self.where(a, rank, i)}: stage {a.stage} has no neighbour stage to exchange with"
                raise self.fail(message, (rank, i))

    def check_compute(self, forward_only: bool) -> None:
        seen: dict[Action, Cell] = {}
        for rank, i, a in self.cells:
            if not a.kind.is_compute:
                continue
            if forward_only and a.kind is Kind.BACKWARD:
                raise self.fail(f"{self.where(a, rank, i)} in a forward-only program", (rank, i))
            if a in seen:
                raise self.fail(f"{self.where(a, rank, i)} runs twice (first at rank {seen[a][0]})", (rank, i))
            if rank != self.placement.rank(a.replica, a.stage):
                owner = self.placement.rank(a.replica, a.stage)
                raise self.fail(f"{self.where(a, rank, i)} belongs on rank {owner}", (rank, i))
            seen[a] = (rank, i)
        kinds = [Kind.FORWARD] if forward_only else [Kind.FORWARD, Kind.BACKWARD]
        missing = [str(a) for a in _all_compute(self.placement, self.num_microbatches, kinds) if a not in seen]
        if missing:
            raise self.fail(f"{len(missing)} compute action(s) never run: {', '.join(missing[:6])}")

    def check_timetable_order(self) -> None:
        slot = {a: i for _, i, a in self.cells}
        for rank, i, a in self.cells:
            before = _slot_predecessors(a, self.placement, self.num_microbatches, self.barrier)
            late = [b for b in before if slot[b] >= i]
            if late:
                raise self.fail(f"{self.where(a, rank, i)} runs before {late[0]} (slot {slot[late[0]]})", (rank, i))

    def check_program_order(self) -> None:
        outputs = output_actions(self.placement, self.num_microbatches)
        for rank, stream in sorted(self.streams.items()):
            done: set[Action] = set()
            for i, a in enumerate(stream):
                if a is None:
                    continue
                before = _local_predecessors(a, self.placement, outputs if self.barrier else None, rank)
                missing = [b for b in before if b not in done]
                if missing:
                    raise self.fail(f"{self.where(a, rank, i)} needs {missing[0]} before it on its rank", (rank, i))
                done.add(a)

    def check_losses(self) -> None:
        """Without the barrier, each (replica, microbatch) has one LOSS, on the rank of its last stage."""
        last = self.placement.num_stages - 1
        found = Counter((a.replica, a.microbatch) for _, _, a in self.cells if a.kind is Kind.LOSS)
        for rank, i, a in self.cells:
            if a.kind is not Kind.LOSS:
                continue
            if self.barrier:
                raise self.fail(f"{self.where(a, rank, i)}: a program with the loss barrier has no LOSS", (rank, i))
            owner = self.placement.rank(a.replica, last)
            if a.stage != last or rank != owner:
                raise self.fail(f"{self.where(a, rank, i)}: the loss belongs on rank {owner}, stage {last}", (rank, i))
            if found[(a.replica, a.microbatch)] > 1:
                raise self.fail(f"{self.where(a, rank, i)} appears {found[(a.replica, a.microbatch)]} times", (rank, i))

    def check_links(self) -> None:
        counts = Counter((a.kind, a.replica, a.stage, a.microbatch) for _, _, a in self.cells if a.kind in _PEER_KIND)
        for rank, i, a in self.cells:
            if a.kind not in _PEER_KIND:
                continue
            src, dst = _link(a, self.placement) or (-1, -1)  # never None: check_fields ran first
            here, there = (src, dst) if a.kind.is_send else (dst, src)
            if (rank, a.peer) != (here, there):
                raise self.fail(f"{self.where(a, rank, i)}: expected on rank {here} with peer {there}", (rank, i))
            key = (a.kind, a.replica, a.stage, a.microbatch)
            match = Action(_PEER_KIND[a.kind], a.replica, a.stage, a.microbatch, here)
            if counts[key] > 1:
                raise self.fail(f"{self.where(a, rank, i)} appears {counts[key]} times", (rank, i))
            if counts[(match.kind, a.replica, a.stage, a.microbatch)] == 0:
                raise self.fail(f"{self.where(a, rank, i)} has no matching {match} on rank {there}", (rank, i))

    def check_outputs(self) -> None:
        if any(a.kind in (Kind.SEND_OUT, Kind.RECV_OUT) for _, _, a in self.cells):
            return self.check_sent_outputs()
        expected = output_actions(self.placement, self.num_microbatches)
        reference: list[Action] | None = None
        for rank, stream in sorted(self.streams.items()):
            found = [(i, a) for i, a in enumerate(stream) if a is not None and a.kind is Kind.OUTPUT]
            order = [a for _, a in found]
            if Counter(order) != Counter(expected):
                raise self.fail(
                    f"rank {rank} has OUTPUT actions {[str(a) for a in order]}; expected each of "
                    f"{[str(a) for a in expected]} once",
                    (rank, found[0][0]) if found else None,
                )
            reference = reference or order
            for (i, a), b in zip(found, reference, strict=True):
                if a != b:
                    raise self.fail(f"{self.where(a, rank, i)}: OUTPUT order differs from rank 0 ({b})", (rank, i))
        return None

    def check_sent_outputs(self) -> None:
        """Asynchronous schedules: the last stage's rank sends each output to every other rank, which receives it
        once (no OUTPUT collective)."""
        last = self.placement.num_stages - 1
        sent = Counter((a.microbatch, a.peer) for _, _, a in self.cells if a.kind is Kind.SEND_OUT)
        for rank, i, a in self.cells:
            if a.kind is Kind.OUTPUT:
                raise self.fail(f"{self.where(a, rank, i)}: a program that sends outputs has no OUTPUT", (rank, i))
            if a.kind not in (Kind.SEND_OUT, Kind.RECV_OUT):
                continue
            owner = self.placement.rank(a.replica, last)
            if (
                a.stage != last
                or (a.kind is Kind.SEND_OUT and rank != owner)
                or (a.kind is Kind.RECV_OUT and a.peer != owner)
            ):
                raise self.fail(f"{self.where(a, rank, i)}: outputs go from rank {owner} (stage {last})", (rank, i))
            if a.kind is Kind.RECV_OUT and sent[(a.microbatch, rank)] != 1:
                raise self.fail(f"{self.where(a, rank, i)} has no matching SEND_OUT on rank {owner}", (rank, i))
        for rank in self.streams:
            if rank == self.placement.rank(0, last):
                continue
            got = Counter(a.microbatch for a in self.streams[rank] if a is not None and a.kind is Kind.RECV_OUT)
            missing = [m for m in range(self.num_microbatches) if got[m] != 1]
            if missing:
                raise self.fail(f"rank {rank} receives the output of microbatch {missing[0]} {got[missing[0]]} times")


def _all_compute(placement: Placement, num_microbatches: int, kinds: list[Kind]) -> list[Action]:
    ks, rs, ms = range(placement.num_stages), range(placement.num_replicas), range(num_microbatches)
    return [Action(kind, r, s, m) for kind in kinds for r in rs for m in ms for s in ks]


def _link(action: Action, placement: Placement) -> tuple[int, int] | None:
    """(source rank, destination rank) of the tensor a send/receive moves; None past either end."""
    r, s = action.replica, action.stage
    to = s + 1 if action.kind in (Kind.SEND_ACT, Kind.RECV_ACT) else s - 1
    return (placement.rank(r, s), placement.rank(r, to)) if 0 <= to < placement.num_stages else None


def _slot_predecessors(action: Action, placement: Placement, num_microbatches: int, barrier: bool) -> list[Action]:
    """Compute actions that must run in an earlier slot: the chain predecessor and, for backwards under the loss
    barrier, every last-stage forward (the loss needs all outputs)."""
    r, s, m, last = action.replica, action.stage, action.microbatch, placement.num_stages - 1
    if action.kind is Kind.FORWARD:
        return [Action(Kind.FORWARD, r, s - 1, m)] if s > 0 else []
    chain = Action(Kind.BACKWARD, r, s + 1, m) if s < last else Action(Kind.FORWARD, r, last, m)
    outputs = output_actions(placement, num_microbatches) if barrier else []
    return [chain, *[Action(Kind.FORWARD, o.replica, last, o.microbatch) for o in outputs]]


def _local_predecessors(action: Action, placement: Placement, outputs: list[Action] | None, rank: int) -> list[Action]:
    """Actions that must come earlier on the same rank in a lowered program; ``outputs`` None: no loss barrier
    (a last-stage backward needs its microbatch's LOSS instead of every OUTPUT)."""
    r, s, m, k = action.replica, action.stage, action.microbatch, action.kind
    last = placement.num_stages - 1
    if k is Kind.FORWARD and s > 0:
        return [Action(Kind.RECV_ACT, r, s - 1, m, placement.rank(r, s - 1))]
    if k in (Kind.SEND_ACT, Kind.LOSS, Kind.SEND_OUT) or (k is Kind.OUTPUT and placement.rank(r, s) == rank):
        return [Action(Kind.FORWARD, r, s, m)]
    if k is Kind.BACKWARD:
        grad = [Action(Kind.RECV_GRAD, r, s + 1, m, placement.rank(r, s + 1))] if s < last else []
        loss = outputs if outputs is not None else [Action(Kind.LOSS, r, last, m)] if s == last else []
        return [Action(Kind.FORWARD, r, s, m), *loss, *grad]
    if k is Kind.SEND_GRAD:
        return [Action(Kind.BACKWARD, r, s, m)]
    return []


def validate(
    streams: Streams,
    placement: Placement,
    num_microbatches: int,
    forward_only: bool = False,
    loss_barrier: bool | None = None,
) -> None:
    """Raise ``ScheduleError`` unless ``streams`` (a timetable or a lowered program) is a correct step.

    Checks that every forward (and, unless ``forward_only``, backward) runs exactly once on its rank in
    dependency order; for programs also that sends and receives pair up with consistent peers and that
    every rank runs the OUTPUT collectives in the same order. ``loss_barrier``: whether every backward waits
    for every last-stage output (``None``: a program without LOSS actions does, a timetable does).

    Examples:
        >>> from lightning_cmp.schedule.cmp import cmp
        >>> from lightning_cmp.schedule.lower import lower
        >>> placement = Placement(3, num_replicas=2)
        >>> validate(lower(cmp(3), placement, 1, average_gradients=True), placement, 1)
    """
    checker = _Checker(streams, placement, num_microbatches, loss_barrier)
    checker.check_fields()
    checker.check_compute(forward_only)
    if not checker.is_program:
        if len({len(s) for s in streams.values()}) > 1:
            raise checker.fail("ranks have timetables of different lengths")
        checker.check_timetable_order()
        return
    checker.check_outputs()
    checker.check_losses()
    checker.check_links()
    checker.check_program_order()
