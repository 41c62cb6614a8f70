"""Dry run of a lowered program on all ranks: timings, idle time and deadlocks, without processes.

A compute action of a (replica, microbatch) costs ``cost / (num_replicas * num_microbatches)``: it
handles that fraction of the global batch. With forward 1 and backward 2, mp takes 3K and cmp with even
K takes 1.5K (a 2.0x gain). With odd K the replicas collide on the middle rank: K=3 takes 6.0, not the
5.5 of the paper's formula (3K+2)/2, because with one microbatch the runtime computes the loss from *all*
outputs before any backward (the loss barrier), so replica A cannot start its backward while B's delayed
forward finishes. With microbatches ``cmp`` computes each microbatch's loss on its own (a LOSS action) and
interleaves forwards and backwards.

``SimResult.peak_activations`` is each rank's most activation memory at once, as a fraction of the global
batch's samples held between a stage's forward and its backward (one stage's activations per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lightning_cmp.errors import CMPConfigError, ScheduleError
from lightning_cmp.schedule.action import Action, Kind
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.render import render_program

__all__ = ["DEFAULT_COSTS", "Costs", "SimResult", "Span", "simulate"]

_MATCH = {Kind.RECV_ACT: Kind.SEND_ACT, Kind.RECV_GRAD: Kind.SEND_GRAD, Kind.RECV_OUT: Kind.SEND_OUT}


@dataclass(frozen=True)
class Costs:
    """Time of each action for the *whole* global batch; ``forward``/``backward`` may be per stage."""

    forward: float | Sequence[float] = 1.0
    backward: float | Sequence[float] = 2.0
    send: float = 0.0  # latency added to a send's arrival
    output: float = 0.0
    average: float = 0.0
    loss: float = 0.0  # one microbatch's loss (the user's training_step on it)

    def compute(self, action: Action, num_stages: int) -> float:
        """Full-batch cost of a FORWARD or BACKWARD of ``action.stage``."""
        cost = self.forward if action.kind is Kind.FORWARD else self.backward
        if isinstance(cost, (int, float)):
            return float(cost)
        if len(cost) != num_stages:
            raise CMPConfigError(f"Costs has {len(cost)} per-stage costs for num_stages={num_stages}; give one each")
        return float(cost[action.stage])


#: Forward 1, backward 2 (the usual 1:2 ratio), free communication.
DEFAULT_COSTS = Costs()


@dataclass(frozen=True)
class Span:
    """When one compute action ran."""

    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    """Outcome of `simulate`: step time, per-rank busy time and idle share, and compute spans."""

    makespan: float
    busy: dict[int, float]
    idle_fraction: dict[int, float]
    spans: dict[int, list[Span]]
    peak_activations: dict[int, float] = field(default_factory=dict)


@dataclass
class _State:
    """Mutable state of one dry run."""

    program: Mapping[int, Sequence[Action]]
    placement: Placement
    scale: float
    costs: Costs
    pc: dict[int, int]
    clock: dict[int, float]
    spans: dict[int, list[Span]]
    arrivals: dict[tuple[object, ...], float] = field(default_factory=dict)
    reached: dict[Action, dict[int, float]] = field(default_factory=dict)
    exchanges: dict[int, dict[int, float]] = field(default_factory=dict)  # stage -> rank -> start time
    peers: dict[int, set[int]] = field(default_factory=dict)  # stage -> ranks taking part

    def exchange_end(self, stage: int) -> float | None:
        starts = self.exchanges.get(stage, {})
        if not self.peers.get(stage) or set(starts) < self.peers[stage]:
            return None
        return max(starts.values()) + self.costs.average


def _compute(st: _State, rank: int, a: Action) -> bool:
    start = st.clock[rank]
    st.clock[rank] = start + st.costs.compute(a, st.placement.num_stages) * st.scale
    st.spans[rank].append(Span(a, start, st.clock[rank]))
    return True


def _loss(st: _State, rank: int, a: Action) -> bool:
    st.clock[rank] += st.costs.loss * st.scale
    return True


def _send(st: _State, rank: int, a: Action) -> bool:
    st.arrivals[(a.kind, a.replica, a.stage, a.microbatch, rank, a.peer)] = st.clock[rank] + st.costs.send
    return True


def _recv(st: _State, rank: int, a: Action) -> bool:
    arrival = st.arrivals.get((_MATCH[a.kind], a.replica, a.stage, a.microbatch, a.peer, rank))
    if arrival is None:
        return False
    st.clock[rank] = max(st.clock[rank], arrival)
    return True


def _output(st: _State, rank: int, a: Action) -> bool:
    reached = st.reached.setdefault(a, {})
    reached.setdefault(rank, st.clock[rank])
    if len(reached) < len(st.program):
        return False
    st.clock[rank] = max(reached.values()) + st.costs.output
    return True


def _average(st: _State, rank: int, a: Action) -> bool:
    st.exchanges.setdefault(a.stage, {})[rank] = st.clock[rank]
    st.peers.setdefault(a.stage, set()).update({rank, rank if a.peer is None else a.peer})
    return True


def _wait_average(st: _State, rank: int, a: Action) -> bool:
    mine = [stage for stage, starts in st.exchanges.items() if rank in starts]
    ends = [st.exchange_end(stage) for stage in mine]
    if any(end is None for end in ends):
        return False
    st.clock[rank] = max([st.clock[rank]] + [end for end in ends if end is not None])
    return True


#: One handler per action kind: run the action at ``pc`` if it can go now, return whether it ran.
_HANDLERS: dict[Kind, Callable[[_State, int, Action], bool]] = {
    Kind.FORWARD: _compute,
    Kind.BACKWARD: _compute,
    Kind.SEND_ACT: _send,
    Kind.SEND_GRAD: _send,
    Kind.RECV_ACT: _recv,
    Kind.RECV_GRAD: _recv,
    Kind.LOSS: _loss,
    Kind.OUTPUT: _output,
    Kind.AVERAGE: _average,
    Kind.WAIT_AVERAGE: _wait_average,
    Kind.SEND_OUT: _send,
    Kind.RECV_OUT: _recv,
}


def _advance(st: _State, rank: int) -> bool:
    """Run ``rank`` until it blocks or ends; whether it moved."""
    stream, start = st.program[rank], st.pc[rank]
    while st.pc[rank] < len(stream) and _HANDLERS[stream[st.pc[rank]].kind](st, rank, stream[st.pc[rank]]):
        st.pc[rank] += 1
    return st.pc[rank] > start


def _deadlock(st: _State) -> ScheduleError:
    stuck = {r: st.pc[r] for r in st.program if st.pc[r] < len(st.program[r])}
    waits = "; ".join(f"rank {r} waits at {st.program[r][i]}" for r, i in stuck.items())
    grid = render_program(st.program, marks=stuck.items())
    return ScheduleError(f"deadlock: no rank can progress ({waits})\n{grid}")


def simulate(
    program: Mapping[int, Sequence[Action]], placement: Placement, num_microbatches: int, costs: Costs = DEFAULT_COSTS
) -> SimResult:
    """Dry-run ``program`` on every rank; raise ``ScheduleError`` with the stuck cells marked on deadlock.

    Sends never block (the data arrives ``costs.send`` later); receives wait for it; OUTPUT completes
    when every rank reached it; AVERAGE starts an exchange done at max(both starts) + ``costs.average``,
    and WAIT_AVERAGE waits for this rank's exchanges.

    Examples:
        >>> from lightning_cmp.schedule.cmp import cmp
        >>> from lightning_cmp.schedule.lower import lower
        >>> placement = Placement(4, num_replicas=2)
        >>> simulate(lower(cmp(4), placement, 1, average_gradients=True), placement, 1).makespan
        6.0
    """
    scale = 1.0 / (placement.num_replicas * num_microbatches)
    ranks = list(program)
    st = _State(
        program, placement, scale, costs, dict.fromkeys(ranks, 0), dict.fromkeys(ranks, 0.0), {r: [] for r in ranks}
    )
    while any(st.pc[r] < len(program[r]) for r in ranks):
        moved = [_advance(st, r) for r in ranks]  # a list, not any(): every rank gets its turn
        if not any(moved):
            raise _deadlock(st)
    makespan = max(st.clock.values(), default=0.0)
    busy = {r: sum(s.end - s.start for s in st.spans[r]) for r in ranks}
    idle = {r: 1.0 - busy[r] / makespan if makespan else 0.0 for r in ranks}
    peaks = {r: _peak_activations(st.spans[r], scale) for r in ranks}
    return SimResult(makespan, busy, idle, st.spans, peaks)


def _peak_activations(spans: list[Span], share: float) -> float:
    """Most ``share``-sized microbatches held at once: from a forward's start until its backward's end."""
    held = peak = 0.0
    for span in spans:  # one rank's spans, in the order it ran them
        if span.action.kind is Kind.FORWARD:
            held += share
            peak = max(peak, held)
        else:
            held -= share
    return peak
