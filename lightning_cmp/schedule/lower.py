"""Lowering: turn a timetable into per-rank action streams with sends, receives, outputs and averaging.

A send and its receive carry the same ``(replica, stage, microbatch)``: the stage that *produced* the
tensor. ``SEND_ACT.A0.m0->1`` on rank 0 pairs with ``RECV_ACT.A0.m0<-0`` on rank 1, which feeds ``F.A1``;
``SEND_GRAD.A1.m0->0`` (the input gradient of stage 1) pairs with ``RECV_GRAD.A1.m0<-1``, which feeds
``B.A0``. K=2 mp lowers to:

```text
step rank 0             rank 1
0:   F.A0.m0            RECV_ACT.A0.m0<-0
1:   SEND_ACT.A0.m0->1  F.A1.m0
2:   OUTPUT.A1.m0       OUTPUT.A1.m0
3:   RECV_GRAD.A1.m0<-1 B.A1.m0
4:   B.A0.m0            SEND_GRAD.A1.m0->0
```
"""

from __future__ import annotations

from lightning_cmp.schedule.action import Action, Kind, Program
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.timetable import Timetable, compute_order

__all__ = ["Program", "lower", "lower_forward_only", "output_actions", "split_phases"]

#: rank -> the actions that rank runs, in order.


def _forward(action: Action, placement: Placement) -> list[Action]:
    r, s, m = action.replica, action.stage, action.microbatch
    before = [Action(Kind.RECV_ACT, r, s - 1, m, placement.rank(r, s - 1))] if s > 0 else []
    after = [Action(Kind.SEND_ACT, r, s, m, placement.rank(r, s + 1))] if s < placement.num_stages - 1 else []
    return [*before, action, *after]


def _backward(action: Action, placement: Placement) -> list[Action]:
    r, s, m = action.replica, action.stage, action.microbatch
    before = [Action(Kind.RECV_GRAD, r, s + 1, m, placement.rank(r, s + 1))] if s < placement.num_stages - 1 else []
    after = [Action(Kind.SEND_GRAD, r, s, m, placement.rank(r, s - 1))] if s > 0 else []
    return [*before, action, *after]


def output_actions(placement: Placement, num_microbatches: int) -> list[Action]:
    """The OUTPUT collectives, in the same canonical order on every rank (lowering appends them; validation
    expects them)."""
    last = placement.num_stages - 1
    return [Action(Kind.OUTPUT, r, last, m) for r in range(placement.num_replicas) for m in range(num_microbatches)]


def _averages(rank: int, backwards: list[Action], placement: Placement) -> dict[int, Action]:
    """Index into ``backwards`` -> the AVERAGE to start after it: each stage's last backward on ``rank``."""
    last_index: dict[int, int] = {}  # stage -> index of the last backward of any copy of it on this rank
    for i, action in enumerate(backwards):
        last_index[action.stage] = i
    averages = {}
    for stage, i in last_index.items():
        replica = backwards[i].replica
        if placement.num_replicas == 1:  # one copy per pipeline: averaged with the other pipelines' only
            averages[i] = Action(Kind.AVERAGE, replica, stage, 0, rank)
            continue
        peer = placement.rank(1 - replica, stage)
        shared = peer == rank  # odd K, middle rank: both copies live here, so one exchange covers them
        averages[i] = Action(Kind.AVERAGE, 0 if shared else replica, stage, 0, peer)
    return averages


def lower_forward_only(timetable: Timetable, placement: Placement, num_microbatches: int) -> Program:
    """The evaluation program: each rank's forwards with their sends/receives, then the OUTPUT actions.

    Examples:
        >>> from lightning_cmp.schedule.mp import mp
        >>> [str(a) for a in lower_forward_only(mp(2), Placement(2), 1)[1]]
        ['RECV_ACT.A0.m0<-0', 'F.A1.m0', 'OUTPUT.A1.m0']
    """
    outputs = output_actions(placement, num_microbatches)
    program: Program = {}
    for rank in timetable:
        forwards = [a for a in compute_order(timetable, rank) if a.kind is Kind.FORWARD]
        program[rank] = [x for a in forwards for x in _forward(a, placement)] + outputs
    return program


def lower(
    timetable: Timetable,
    placement: Placement,
    num_microbatches: int,
    average_gradients: bool,
    loss_per_microbatch: bool = False,
) -> Program:
    """The training program of one step, per rank.

    With the loss barrier (default): forward phase, OUTPUT actions, backward phase, averaging. With
    ``loss_per_microbatch`` the compute actions keep the timetable's interleaved order, a ``LOSS`` action
    (the microbatch's output gradient, from the user's loss) comes right before each last-stage backward, and
    the OUTPUT actions close the stream, after the averaging finished.

    With ``average_gradients``, each stage copy starts an ``AVERAGE`` with its mirror right after its last
    backward's gradient send, and ``WAIT_AVERAGE`` waits for them all. With one replica its peer is the rank
    itself: the copy is averaged with the other data-parallel pipelines' copies only (asked for only then).

    Examples:
        >>> from lightning_cmp.schedule.cmp import cmp
        >>> program = lower(cmp(2), Placement(2, 2), 1, average_gradients=True)
        >>> [str(a) for a in program[0][-3:]]
        ['B.A0.m0', 'AVERAGE.A0.m0<->1', 'WAIT_AVERAGE']
        >>> program = lower(cmp(2, 2), Placement(2, 2), 2, average_gradients=True, loss_per_microbatch=True)
        >>> [str(a) for a in program[1][4:7]]
        ['LOSS.A1.m0', 'B.A1.m0', 'SEND_GRAD.A1.m0->0']
    """
    average = average_gradients
    if not loss_per_microbatch:
        program = lower_forward_only(timetable, placement, num_microbatches)
        for rank, stream in program.items():
            backwards = [a for a in compute_order(timetable, rank) if a.kind is Kind.BACKWARD]
            averages = _averages(rank, backwards, placement) if average else {}
            for i, action in enumerate(backwards):
                stream += _backward(action, placement)
                stream += [averages[i]] if i in averages else []
            stream += [Action(Kind.WAIT_AVERAGE)] if average else []
        return program
    last = placement.num_stages - 1
    program = {}
    for rank in timetable:
        order = compute_order(timetable, rank)
        backwards = [a for a in order if a.kind is Kind.BACKWARD]
        averages = _averages(rank, backwards, placement) if average else {}
        actions: list[Action] = []
        done_backwards = 0
        for action in order:
            if action.kind is Kind.FORWARD:
                actions += _forward(action, placement)
                continue
            loss = action.stage == last
            actions += [Action(Kind.LOSS, action.replica, last, action.microbatch)] if loss else []
            actions += _backward(action, placement)
            actions += [averages[done_backwards]] if done_backwards in averages else []
            done_backwards += 1
        actions += [Action(Kind.WAIT_AVERAGE)] if average else []
        program[rank] = actions + output_actions(placement, num_microbatches)
    return program


def split_phases(actions: list[Action]) -> tuple[list[Action], list[Action]]:
    """Split one rank's stream after its last OUTPUT: (forward phase with outputs, backward phase).

    A program with a loss per microbatch ends with its OUTPUT actions: all of it runs in the forward phase.

    Examples:
        >>> f, b = split_phases([Action(Kind.FORWARD), Action(Kind.OUTPUT), Action(Kind.BACKWARD)])
        >>> len(f), len(b)
        (2, 1)
    """
    outputs = [i for i, a in enumerate(actions) if a.kind is Kind.OUTPUT]
    cut = outputs[-1] + 1 if outputs else len(actions)
    return actions[:cut], actions[cut:]
