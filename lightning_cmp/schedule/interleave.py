"""Micro-batched ``cmp``'s order: both replicas' microbatches interleaved 1F1B-style, by list scheduling.

Every candidate order is lowered and timed with the simulator (`simulate`), so the choice is made by the same
model of a step that the docs and benchmarks use.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule.action import Action, Kind
from lightning_cmp.schedule.lower import lower
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.simulate import Costs, simulate
from lightning_cmp.schedule.timetable import StageCosts, Timetable, _chain, _order_predecessors

__all__ = ["build_interleaved"]


def _backward_first(action: Action) -> tuple[bool, int, int]:
    """A backward first (it frees activations and feeds the next rank), then the older microbatch, replica A."""
    return action.kind is not Kind.BACKWARD, action.microbatch, action.replica


def _forward_first(action: Action) -> tuple[bool, int, int]:
    """A forward first (it fills the pipeline sooner; the in-flight bound still caps it), then the older
    microbatch, replica A."""
    return action.kind is Kind.BACKWARD, action.microbatch, action.replica


_PRIORITIES = (_backward_first, _forward_first)


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
    return min(tables, key=lambda table: _timed(table, placement, num_microbatches, Costs(forward, backward)))


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


def _timed(table: Timetable, placement: Placement, num_microbatches: int, costs: Costs) -> tuple[float, float]:
    """(step time, most activations one rank holds) of ``table`` run with ``costs``, per the simulator."""
    program = lower(table, placement, num_microbatches, average_gradients=False, loss_per_microbatch=True)
    result = simulate(program, placement, num_microbatches, costs)
    return result.makespan, max(result.peak_activations.values())
