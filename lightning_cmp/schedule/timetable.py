"""The timetable type and the one greedy list scheduler every schedule is built with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule.action import Action, Kind
from lightning_cmp.schedule.placement import Placement

__all__ = ["Schedule", "StageCosts", "Timetable", "build_timetable", "compute_order", "resolve_placement"]

#: rank -> slots; ``None`` is an idle slot. Every rank's list has the same length.
Timetable: TypeAlias = dict[int, list[Action | None]]


class Schedule(Protocol):
    """What every schedule function looks like: it returns the timetable of one training step."""

    def __call__(self, num_stages: int, num_microbatches: int = 1, placement: Placement | None = None) -> Timetable: ...


def resolve_placement(num_stages: int, num_replicas: int, placement: Placement | None) -> Placement:
    """The placement to schedule on: ``placement`` after checking it fits, or the default one.

    Examples:
        >>> resolve_placement(4, 2, None)
        Placement(num_stages=4, num_replicas=2)
    """
    if placement is None:
        return Placement(num_stages, num_replicas)
    if (placement.num_stages, placement.num_replicas) != (num_stages, num_replicas):
        raise ScheduleError(
            f"{placement} does not fit num_stages={num_stages} with {num_replicas} replica(s); "
            f"pass Placement(num_stages={num_stages}, num_replicas={num_replicas}) or None"
        )
    return placement


def _chain(replica: int, microbatch: int, num_stages: int) -> list[Action]:
    """One (replica, microbatch) in dependency order: F0..F(K-1), then B(K-1)..B0."""
    forwards = [Action(Kind.FORWARD, replica, s, microbatch) for s in range(num_stages)]
    backwards = [Action(Kind.BACKWARD, replica, s, microbatch) for s in reversed(range(num_stages))]
    return forwards + backwards


def _order_predecessors(action: Action, num_microbatches: int, num_stages: int, interleave: bool) -> list[Action]:
    """Order inside one stage copy. Fill-drain: forwards by microbatch, backwards in reverse. Interleaved
    (1F1B): backwards by microbatch too, and stage ``s`` holds at most ``K - s`` microbatches' activations at
    once, so a forward waits for the backward that frees its place."""
    r, s, m = action.replica, action.stage, action.microbatch
    if action.kind is Kind.FORWARD:
        order = [Action(Kind.FORWARD, r, s, m - 1)] if m > 0 else []
        in_flight = num_stages - s
        return order + ([Action(Kind.BACKWARD, r, s, m - in_flight)] if interleave and m >= in_flight else [])
    if interleave:
        return [Action(Kind.BACKWARD, r, s, m - 1)] if m > 0 else []
    return [Action(Kind.BACKWARD, r, s, m + 1)] if m < num_microbatches - 1 else []


#: Per-stage costs of a whole batch: (forwards, backwards).
StageCosts = tuple[Sequence[float], Sequence[float]]


def build_timetable(placement: Placement, num_microbatches: int) -> Timetable:
    """Fill-drain: greedily place every (replica, microbatch) chain, one action per rank per slot.

    An action runs in the first slot after its chain predecessor and its order predecessor ran, on a free
    rank; ties go to replica A, then the lower microbatch. No backward starts before every last-stage forward
    ran (the runtime computes the loss from all outputs at once: the *loss barrier*).

    Examples:
        >>> table = build_timetable(Placement(2), num_microbatches=1)
        >>> [[a.short if a else "." for a in table[r]] for r in (0, 1)]
        [['FA0', '.', '.', 'BA0'], ['.', 'FA1', 'BA1', '.']]
    """
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches={num_microbatches}; it must be at least 1")
    k, m_count = placement.num_stages, num_microbatches
    keys = [(r, m) for r in range(placement.num_replicas) for m in range(m_count)]
    chains = {key: _chain(*key, k) for key in keys}
    last_forwards = [Action(Kind.FORWARD, r, k - 1, m) for r, m in keys]
    slot_of: dict[Action, int] = {}
    table: Timetable = {rank: [] for rank in range(placement.num_ranks)}
    slot = 0
    while len(slot_of) < len(keys) * 2 * k:
        done = set(slot_of)
        barrier_open = all(a in done for a in last_forwards)
        placed = False
        for key in keys:  # replica A first, then the lower microbatch: the tie-break order
            chain = chains[key]
            index = sum(a in done for a in chain)
            if index == len(chain):
                continue
            action = chain[index]
            rank = placement.rank(action.replica, action.stage)
            blocked = any(p not in done for p in _order_predecessors(action, m_count, k, False))
            if len(table[rank]) > slot or blocked or (action.kind is Kind.BACKWARD and not barrier_open):
                continue
            table[rank].append(action)
            slot_of[action] = slot
            placed = True
        if not placed:
            raise ScheduleError(f"the greedy scheduler is stuck at slot {slot} on {placement}")
        slot += 1
        for actions in table.values():
            actions.extend([None] * (slot - len(actions)))
    return table


def compute_order(timetable: Timetable, rank: int) -> list[Action]:
    """The compute actions of ``rank`` in slot order, idle slots dropped.

    Examples:
        >>> [a.short for a in compute_order({0: [Action(Kind.FORWARD), None, Action(Kind.BACKWARD)]}, 0)]
        ['FA0', 'BA0']
    """
    return [a for a in timetable[rank] if a is not None]
