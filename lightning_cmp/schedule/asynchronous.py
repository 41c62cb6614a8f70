"""Asynchronous 1F1B (PipeDream's schedule): whole mini-batches, per-stage updates, no flush between steps.

K stages on K ranks, one replica. Lightning's training step ``i`` feeds mini-batch ``i``: every stage runs its
forward in that step, and stage ``k`` runs the backward of mini-batch ``i - (K - k - 1)`` right after it, then
steps its own optimizer. So stage ``k`` starts with ``K - k - 1`` warm-up forwards and holds at most ``K - k``
mini-batches at once; the last stage runs each mini-batch's forward, the user's loss and its backward in the
same step. When the pipeline is *drained* (before validation, at the end of an epoch, before a checkpoint, at
``max_steps``) each stage runs the backwards still owed, each followed by its update: ``fit`` on N batches makes
exactly N updates of every stage. K=3, four mini-batches, then the drain (``render_async(3, 4, "stash")``)::

    step    0         1         2         3         drain 1   drain 2
    rank 0: F0@0      F1@0      F2@0 B0@0 F3@1 B1@0 B2@0      B3@1
    rank 1: F0@0      F1@0 B0@0 F2@1 B1@0 F3@2 B2@1 B3@2
    rank 2: F0@0 B0   F1@1 B1   F2@2 B2   F3@3 B3

``F3@1``: the forward of mini-batch 3 uses the stage's weights after 1 update (``@1+2``: those weights predicted
2 updates ahead). The three weight policies differ only in the versions a mini-batch meets:

* ``current`` (``strategy="async"``): whatever is current, in the forward and in the backward (stale and
  inconsistent: the backward's weights differ from the forward's);
* ``stash`` (``"pipedream"``): the backward uses the version its forward used (one stashed copy per mini-batch in
  flight on the stage);
* ``predict`` (``"spectrain"``): the forward uses the weights predicted ``s = floor(k/2) + K - k - 1`` updates
  ahead and the backward ``s = floor(k/2)`` updates ahead of the current ones (SpecTrain).

The other ranks need each mini-batch's output for the user's ``training_step`` (the loss they log): the last
stage's rank sends it to each of them (``SEND_OUT``/``RECV_OUT``) right after its forward, and they receive it
after their own backward, so in the steady state no rank waits for it while ``K * forward <= forward + backward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule.action import Action, Kind, Program
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.render import _grid
from lightning_cmp.schedule.timetable import StageCosts, Timetable, resolve_placement

__all__ = [
    "WEIGHT_POLICIES",
    "SteadyState",
    "Version",
    "async_1f1b",
    "drain_actions",
    "lower_async",
    "prediction_steps",
    "render_async",
    "slot_actions",
    "steady_state",
    "weight_versions",
]

#: The weight policies of the asynchronous schedules.
WEIGHT_POLICIES = ("current", "stash", "predict")


@dataclass(frozen=True)
class Version:
    """The weights a pass uses: the stage's weights after ``base`` updates (counted from when the pipeline last
    filled), predicted ``ahead`` updates further (0: the weights themselves)."""

    base: int
    ahead: int = 0

    def __str__(self) -> str:
        return f"{self.base}+{self.ahead}" if self.ahead else str(self.base)


def _check(num_stages: int, stage: int) -> None:
    if num_stages < 2 or not 0 <= stage < num_stages:
        raise ScheduleError(f"stage {stage} of num_stages={num_stages}: an asynchronous pipeline needs >= 2 stages")


def prediction_steps(num_stages: int, stage: int) -> tuple[int, int]:
    """SpecTrain's prediction distances of ``stage`` (0-based): (forward, backward) = (floor(k/2) + K - k - 1,
    floor(k/2)).

    Examples:
        >>> [prediction_steps(4, k) for k in range(4)]
        [(3, 0), (2, 0), (2, 1), (1, 1)]
    """
    _check(num_stages, stage)
    return stage // 2 + num_stages - stage - 1, stage // 2


def weight_versions(num_stages: int, stage: int, batch: int, policy: str) -> tuple[Version, Version]:
    """(forward, backward) weight versions of mini-batch ``batch`` (counted from when the pipeline last filled) on
    ``stage`` under ``policy``.

    Stage ``k`` has made ``max(0, j - (K - k - 1))`` updates when mini-batch ``j``'s forward runs and ``j`` when its
    backward does (the updates of the mini-batches before it).

    Examples:
        >>> [str(v) for v in weight_versions(2, 0, 3, "current")]
        ['2', '3']
        >>> [str(v) for v in weight_versions(2, 0, 3, "stash")]
        ['2', '2']
        >>> [str(v) for v in weight_versions(2, 0, 3, "predict")]
        ['2+1', '3']
    """
    _check(num_stages, stage)
    if policy not in WEIGHT_POLICIES:
        raise ScheduleError(f"weight policy {policy!r}; valid: {', '.join(map(repr, WEIGHT_POLICIES))}")
    forward = max(0, batch - (num_stages - stage - 1))
    if policy == "current":
        return Version(forward), Version(batch)
    if policy == "stash":
        return Version(forward), Version(forward)
    ahead_f, ahead_b = prediction_steps(num_stages, stage)
    return Version(forward, ahead_f), Version(batch, ahead_b)


def _forward_part(num_stages: int, rank: int, batch: int) -> list[Action]:
    recv = [Action(Kind.RECV_ACT, 0, rank - 1, batch, rank - 1)] if rank > 0 else []
    send = [Action(Kind.SEND_ACT, 0, rank, batch, rank + 1)] if rank < num_stages - 1 else []
    return [*recv, Action(Kind.FORWARD, 0, rank, batch), *send]


def _backward_part(num_stages: int, rank: int, batch: int) -> list[Action]:
    last = num_stages - 1
    recv = [Action(Kind.RECV_GRAD, 0, rank + 1, batch, rank + 1)] if rank < last else []
    send = [Action(Kind.SEND_GRAD, 0, rank, batch, rank - 1)] if rank > 0 else []
    return [*recv, Action(Kind.BACKWARD, 0, rank, batch), *send]


def slot_actions(num_stages: int, rank: int, slot: int) -> list[Action]:
    """What ``rank`` runs in the training step that feeds mini-batch ``slot`` (counted from the last fill).

    The last stage: receive, forward, send the output to every other rank, the user's loss (``LOSS``), backward,
    send the input gradient. Stage ``k`` < K-1: receive, forward, send, then the backward of mini-batch
    ``slot - (K - k - 1)`` (none in the warm-up), then receive the output of mini-batch ``slot``.

    Examples:
        >>> [str(a) for a in slot_actions(2, 0, 1)]
        ['F.A0.m1', 'SEND_ACT.A0.m1->1', 'RECV_GRAD.A1.m0<-1', 'B.A0.m0', 'RECV_OUT.A1.m1<-1']
        >>> [str(a) for a in slot_actions(2, 1, 1)]
        ['RECV_ACT.A0.m1<-0', 'F.A1.m1', 'SEND_OUT.A1.m1->0', 'LOSS.A1.m1', 'B.A1.m1', 'SEND_GRAD.A1.m1->0']
    """
    _check(num_stages, rank)
    last = num_stages - 1
    actions = _forward_part(num_stages, rank, slot)
    if rank == last:
        actions += [Action(Kind.SEND_OUT, 0, last, slot, r) for r in range(last)]
        return [*actions, Action(Kind.LOSS, 0, last, slot), *_backward_part(num_stages, rank, slot)]
    owed = slot - (num_stages - rank - 1)
    actions += _backward_part(num_stages, rank, owed) if owed >= 0 else []
    return [*actions, Action(Kind.RECV_OUT, 0, last, slot, last)]


def drain_actions(num_stages: int, rank: int, fed: int) -> list[list[Action]]:
    """The backwards ``rank`` still owes after ``fed`` mini-batches, one list per update (oldest first).

    Examples:
        >>> [[str(a) for a in update] for update in drain_actions(2, 0, 3)]
        [['RECV_GRAD.A1.m2<-1', 'B.A0.m2']]
        >>> drain_actions(2, 1, 3)
        []
    """
    _check(num_stages, rank)
    owed = range(max(0, fed - (num_stages - rank - 1)), fed)
    return [_backward_part(num_stages, rank, j) for j in owed]


def lower_async(num_stages: int, num_batches: int) -> Program:
    """Every rank's actions for ``num_batches`` training steps and the drain after them, in order.

    Examples:
        >>> program = lower_async(2, 2)
        >>> [str(a) for a in program[0][-2:]]
        ['RECV_GRAD.A1.m1<-1', 'B.A0.m1']
    """
    program: Program = {}
    for rank in range(num_stages):
        stream = [a for slot in range(num_batches) for a in slot_actions(num_stages, rank, slot)]
        program[rank] = stream + [a for update in drain_actions(num_stages, rank, num_batches) for a in update]
    return program


def async_1f1b(num_stages: int, num_microbatches: int = 1, placement: Placement | None = None) -> Timetable:
    """The timetable of ``num_microbatches`` whole mini-batches fed one per training step, then the drain: each
    rank's compute actions in the order it runs them, placed greedily in unit slots after what they depend on.

    Examples:
        >>> from lightning_cmp.schedule.render import render
        >>> print(render(async_1f1b(2, 3)))
        slot    0     1     2     3     4     5     6     7
        rank 0: FA0   FA0.1 .     BA0   FA0.2 BA0.1 .     BA0.2
        rank 1: .     FA1   BA1   FA1.1 BA1.1 FA1.2 BA1.2 .
    """
    placement = resolve_placement(num_stages, 1, placement)
    program = lower_async(num_stages, num_microbatches)
    order = {r: [a for a in program[r] if a.kind.is_compute] for r in program}
    slot_of: dict[Action, int] = {}
    table: Timetable = {r: [] for r in program}
    last = num_stages - 1
    while any(len([a for a in table[r] if a]) < len(order[r]) for r in order):
        slot = len(table[0])
        placed = []
        for rank, actions in order.items():
            done = len([a for a in table[rank] if a])
            if done == len(actions):
                continue
            a = actions[done]
            if a.kind is Kind.FORWARD:
                before = [Action(Kind.FORWARD, 0, a.stage - 1, a.microbatch)] if a.stage > 0 else []
            elif a.stage == last:
                before = [Action(Kind.FORWARD, 0, last, a.microbatch)]
            else:
                before = [Action(Kind.BACKWARD, 0, a.stage + 1, a.microbatch)]
            if all(b in slot_of and slot_of[b] < slot for b in before):
                placed.append((rank, a))
        if not placed:
            raise ScheduleError(f"the asynchronous 1F1B order is stuck at slot {slot}")  # pragma: no cover
        for rank in table:
            mine = [a for r, a in placed if r == rank]
            table[rank].append(mine[0] if mine else None)
            if mine:
                slot_of[mine[0]] = slot
    return table


def render_async(num_stages: int, num_batches: int, policy: str) -> str:
    """Ranks as rows, Lightning's training steps (then the drain's updates) as columns; each cell lists the forward
    and backward run there with the weight version each uses (`weight_versions`; the last stage's backward uses
    the forward's graph right away, so it shows no version unless the policy predicts).

    Examples:
        >>> print(render_async(2, 2, "predict"))
        step    0           1           drain 1
        rank 0: F0@0+1      F1@0+1 B0@0 B1@1
        rank 1: F0@0 B0     F1@1 B1
    """
    last = num_stages - 1
    columns = [str(i) for i in range(num_batches)] + [f"drain {d + 1}" for d in range(num_stages - 1)]
    rows = []
    for rank in range(num_stages):
        cells = []
        for actions in [slot_actions(num_stages, rank, i) for i in range(num_batches)] + drain_actions(
            num_stages, rank, num_batches
        ):
            parts = []
            for a in actions:
                if not a.kind.is_compute:
                    continue
                forward, backward = weight_versions(num_stages, rank, a.microbatch, policy)
                version = forward if a.kind is Kind.FORWARD else backward
                same_step = a.kind is Kind.BACKWARD and rank == last and version == forward
                parts.append(f"{a.kind.value}{a.microbatch}" + ("" if same_step else f"@{version}"))
            cells.append(" ".join(parts))
        cells += [""] * (len(columns) - len(cells))
        rows.append((f"rank {rank}:", cells))
    return _grid("step", columns, rows)


@dataclass(frozen=True)
class SteadyState:
    """Time per mini-batch once the pipeline is full, and each rank's idle share then."""

    seconds_per_batch: float
    idle_fraction: Mapping[int, float]
    fill_drain: float  # the extra time of one fill and drain, over the steady state's


def steady_state(stage_costs: StageCosts, output_cost: float = 0.0, send_cost: float = 0.0) -> SteadyState:
    """Simulate the lowered asynchronous program from per-stage whole-batch (forward, backward) times: the time per
    mini-batch is the slope between a run of 4K and one of 8K mini-batches; with unit-ratio costs and
    ``K * forward <= forward + backward`` no rank is ever idle once the pipeline is full.

    Examples:
        >>> state = steady_state(([1.0, 1.0], [2.0, 2.0]))
        >>> state.seconds_per_batch, max(state.idle_fraction.values())
        (3.0, 0.0)
    """
    from lightning_cmp.schedule.simulate import Costs, simulate

    forward, backward = (list(c) for c in stage_costs)
    k = len(forward)
    placement = Placement(k)
    costs = Costs(forward, backward, send=send_cost, output=output_cost)
    short, long = 4 * k, 8 * k
    results = {n: simulate(lower_async(k, n), placement, 1, costs) for n in (short, long)}
    period = (results[long].makespan - results[short].makespan) / (long - short)
    idle = {rank: max(0.0, 1.0 - (forward[rank] + backward[rank]) / period) for rank in range(k)}
    fill_drain = results[long].makespan - long * period
    return SteadyState(period, idle, fill_drain)
