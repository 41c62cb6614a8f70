"""Property sweep: every synchronous schedule for K in 1..8 and M in 1..4 validates, lowers, pairs up and simulates
(the asynchronous ones lower across training steps: ``test_asynchronous.py``)."""

from __future__ import annotations

from collections import Counter

import pytest

from lightning_cmp.schedule import SCHEDULES, Kind, lower, lower_forward_only, simulate, validate

CASES = [
    (name, k, m) for name, spec in SCHEDULES.items() if not spec.asynchronous for k in range(1, 9) for m in range(1, 5)
]


@pytest.mark.parametrize(("name", "num_stages", "num_microbatches"), CASES)
def test_schedule_properties(name: str, num_stages: int, num_microbatches: int) -> None:
    spec = SCHEDULES[name]
    placement = spec.placement(num_stages)
    table = spec.build(num_stages, num_microbatches, placement)
    per_microbatch = spec.loss_per_microbatch(num_microbatches)
    validate(table, placement, num_microbatches, loss_barrier=not per_microbatch)
    for rank in range(num_stages):
        forwards = [a for a in table[rank] if a is not None and a.kind is Kind.FORWARD]
        assert len(forwards) == len(placement.stages_on(rank)) * num_microbatches
    for average in (False, True):
        program = lower(table, placement, num_microbatches, average, per_microbatch)
        validate(program, placement, num_microbatches)
        kinds = Counter(a.kind for actions in program.values() for a in actions)
        assert kinds[Kind.LOSS] == (spec.num_replicas * num_microbatches if per_microbatch else 0)
        assert kinds[Kind.SEND_ACT] == kinds[Kind.RECV_ACT] == spec.num_replicas * num_microbatches * (num_stages - 1)
        assert kinds[Kind.SEND_GRAD] == kinds[Kind.RECV_GRAD] == kinds[Kind.SEND_ACT]
        result = simulate(program, placement, num_microbatches)
        assert result.makespan >= max(result.busy.values())
    evaluation = lower_forward_only(table, placement, num_microbatches)
    validate(evaluation, placement, num_microbatches, forward_only=True)
    simulate(evaluation, placement, num_microbatches)
