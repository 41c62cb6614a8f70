"""The timetable type and the one greedy list scheduler every schedule is built with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule.action import Action, Kind
from lightning_cmp.schedule.placement import Placement

__all__ = [
    "Schedule",
    "StageCosts",
    "Timetable",
    "build_interleaved",
    "build_timetable",
    "compute_order",
    "resolve_placement",
]

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


def _backward_first(action: Action) -> tuple[bool, int, int]:
    """A backward first (it frees activations and feeds the next rank), then the older microbatch, replica A."""
    return action.kind is not Kind.BACKWARD, action.microbatch, action.replica


def _forward_first(action: Action) -> tuple[bool, int, int]:
    """A forward first (it fills the pipeline sooner; the in-flight bound still caps it), then the older
    microbatch, replica A."""
    return action.kind is Kind.BACKWARD, action.microbatch, action.replica


_PRIORITIES = (_backward_first, _forward_first)

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


def build_interleaved(
    placement: Placement, num_microbatches: int, backward_cost: float = 2.0, stage_costs: StageCosts | None = None
) -> Timetable:
    """1F1B-style interleaving of every (replica, microbatch): the best of a few list-scheduling runs.

    Each microbatch's loss is computed as soon as its last-stage forward ran (no loss barrier), and stage ``s``
    of a replica keeps at most ``K - s`` microbatches in flight (1F1B's bound: a rank holds at most K + 1 of
    its two stage copies' microbatches). Actions are placed in time: the action that can start earliest goes
    next; where one rank can start several, a backward goes first in one run and a forward in the other, then
    the older microbatch, then replica A. Times come from a forward costing 1 and a backward ``backward_cost``
    and, when given, also from ``stage_costs`` (measured per-stage forward and backward costs, e.g. the
    balanced partition's profile); each run's order is then timed with the costs asked for and the fastest is
    kept (on a tie, the one holding fewer activations), so measured costs never make the order slower. The
    timetable's slots are the distinct start times, so its order is what the runtime runs.
    With unit costs and even K the idle share is Chimera's (K-2)/(2N'+K-2), N' = 2 x ``num_microbatches``
    microbatches per step, whenever N' is a multiple of K.

    Examples:
        >>> table = build_interleaved(Placement(2, 2), num_microbatches=2)
        >>> [a.short for a in table[0] if a]
        ['FA0', 'FB1', 'BB1', 'BA0', 'FA0.1', 'FB1.1', 'BB1.1', 'BA0.1']
    """
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches={num_microbatches}; it must be at least 1")
    k = placement.num_stages
    forward, backward = stage_costs if stage_costs is not None else ([1.0] * k, [backward_cost] * k)
    if len(forward) != k or len(backward) != k:
        raise ScheduleError(f"stage_costs: {len(forward)} forward and {len(backward)} backward costs for {k} stages")
    models = [(forward, backward)] if stage_costs is None else [(forward, backward), ([1.0] * k, [2.0] * k)]
    tables = [_list_schedule(placement, num_microbatches, m, priority) for m in models for priority in _PRIORITIES]
    # each order timed with the costs asked for (a greedy built for them is not always the fastest under them)
    return min(tables, key=lambda table: _timed(table, placement, num_microbatches, (forward, backward)))


def _list_schedule(
    placement: Placement,
    num_microbatches: int,
    costs: StageCosts,
    priority: Callable[[Action], tuple[bool, int, int]],
) -> Timetable:
    """One list-scheduling run; see `build_interleaved`."""
    k = placement.num_stages
    keys = [(r, m) for r in range(placement.num_replicas) for m in range(num_microbatches)]
    chains = {key: _chain(*key, k) for key in keys}
    end: dict[Action, float] = {}
    start: dict[Action, float] = {}
    free = dict.fromkeys(range(placement.num_ranks), 0.0)
    while len(end) < len(keys) * 2 * k:
        ready: list[tuple[float, int, Action]] = []
        for key in keys:
            chain = chains[key]
            index = sum(a in end for a in chain)
            if index == len(chain):
                continue
            action = chain[index]
            before = _order_predecessors(action, num_microbatches, k, True) + chain[index - 1 : index]
            if all(p in end for p in before):
                rank = placement.rank(action.replica, action.stage)
                ready.append((max([free[rank]] + [end[p] for p in before]), rank, action))
        if not ready:
            raise ScheduleError(f"the list scheduler is stuck on {placement} with {num_microbatches} microbatches")
        earliest = min(t for t, _, _ in ready)
        first = [(rank, action) for t, rank, action in ready if t <= earliest]
        rank = min(r for r, _ in first)
        action = min((a for r, a in first if r == rank), key=priority)
        start[action] = earliest
        end[action] = free[rank] = earliest + costs[0 if action.kind is Kind.FORWARD else 1][action.stage]
    times = sorted(set(start.values()))
    table: Timetable = {rank: [None] * len(times) for rank in range(placement.num_ranks)}
    for action, t in start.items():
        table[placement.rank(action.replica, action.stage)][times.index(t)] = action
    return table


def _timed(table: Timetable, placement: Placement, num_microbatches: int, costs: StageCosts) -> tuple[float, int]:
    """(step time, most microbatches one rank holds) of running ``table``'s per-rank order with ``costs``."""
    orders = {rank: compute_order(table, rank) for rank in table}
    k = placement.num_stages
    end: dict[Action, float] = {}
    free = dict.fromkeys(orders, 0.0)
    position = dict.fromkeys(orders, 0)
    held = dict.fromkeys(orders, 0)
    peak = 0
    while any(position[r] < len(orders[r]) for r in orders):
        for rank, order in orders.items():
            while position[rank] < len(order):
                action = order[position[rank]]
                chain = _chain(action.replica, action.microbatch, k)
                index = chain.index(action)
                if index and chain[index - 1] not in end:
                    break
                begin = max(free[rank], end[chain[index - 1]] if index else 0.0)
                forward = action.kind is Kind.FORWARD
                end[action] = free[rank] = begin + costs[0 if forward else 1][action.stage]
                held[rank] += 1 if forward else -1
                peak = max(peak, held[rank])
                position[rank] += 1
    return max(end.values()), peak


def compute_order(timetable: Timetable, rank: int) -> list[Action]:
    """The compute actions of ``rank`` in slot order, idle slots dropped.

    Examples:
        >>> [a.short for a in compute_order({0: [Action(Kind.FORWARD), None, Action(Kind.BACKWARD)]}, 0)]
        ['FA0', 'BA0']
    """
    return [a for a in timetable[rank] if a is not None]
