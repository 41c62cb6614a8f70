"""Micro-batched ``cmp``: both directions interleaved 1F1B-style, the loss per microbatch (no loss barrier)."""

from __future__ import annotations

import random

import pytest

from lightning_cmp.schedule import (
    Action,
    Costs,
    Kind,
    Placement,
    build_timetable,
    cmp,
    get_schedule,
    gpipe,
    lower,
    render,
    simulate,
    validate,
)

# Slots are the distinct start times with a forward costing 1 and a backward 2, so "." may be a backward still
# running. Stage s of each replica holds at most K - s microbatches' activations.
GOLDEN_K4_N4 = """
slot    0     1     2     3     4     5     6     7     8     9     10    11    12    13    14    15    16    17    18    19    20    21
rank 0: FA0   FA0.1 FA0.2 FB3   FA0.3 BB3   FB3.1 BB3.1 .     FB3.2 BB3.2 .     BA0   .     FB3.3 BB3.3 .     BA0.1 .     BA0.2 .     BA0.3
rank 1: .     FA1   FB2   FA1.1 FB2.1 FA1.2 BB2   .     FB2.2 BA1   .     FA1.3 BB2.1 FB2.3 BA1.1 .     BB2.2 .     BA1.2 BB2.3 BA1.3 .
rank 2: .     FB1   FA2   FB1.1 FA2.1 FB1.2 BA2   .     FA2.2 BB1   .     FB1.3 BA2.1 FA2.3 BB1.1 .     BA2.2 .     BB1.2 BA2.3 BB1.3 .
rank 3: FB0   FB0.1 FB0.2 FA3   FB0.3 BA3   FA3.1 BA3.1 .     FA3.2 BA3.2 .     BB0   .     FA3.3 BA3.3 .     BB0.1 .     BB0.2 .     BB0.3
"""  # noqa: E501


def _run(k: int, n: int, costs: Costs, backward_cost: float = 2.0) -> tuple[float, float, dict[int, float]]:
    placement = Placement(k, 2)
    program = lower(cmp(k, n, placement, backward_cost), placement, n, True, loss_per_microbatch=True)
    validate(program, placement, n)
    result = simulate(program, placement, n, costs)
    return result.makespan, max(result.idle_fraction.values()), result.peak_activations


def test_golden_timetable_k4_n4() -> None:
    assert render(cmp(4, 4)) == GOLDEN_K4_N4.strip("\n")


def test_each_microbatch_loss_comes_right_before_its_last_stage_backward() -> None:
    placement = Placement(4, 2)
    program = lower(cmp(4, 4), placement, 4, True, loss_per_microbatch=True)
    for rank, actions in program.items():
        for i, a in enumerate(actions):
            if a.kind is Kind.LOSS:
                assert rank == placement.rank(a.replica, 3)
                assert actions[i + 1] == Action(Kind.BACKWARD, a.replica, 3, a.microbatch)
        # every rank ends with the OUTPUT collectives, in the same order
        assert [a.kind for a in actions[-8:]] == [Kind.OUTPUT] * 8


@pytest.mark.parametrize("k", [2, 4, 6, 8])
@pytest.mark.parametrize("units", [1, 2, 4])
def test_idle_share_equals_chimeras_for_even_k(k: int, units: int) -> None:
    # Chimera's bubble ratio (K-2)/(2N'+K-2) counts forward and backward alike and N' microbatches per step in
    # all (ours: N per replica, so N' = 2N), for N' a multiple of K (its basic unit of K microbatches, repeated).
    n = units * k // 2
    _, idle, _ = _run(k, n, Costs(forward=1.0, backward=1.0), backward_cost=1.0)
    assert idle == pytest.approx((k - 2) / (2 * 2 * n + k - 2))


@pytest.mark.parametrize("k", range(3, 9))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_interleaving_beats_the_loss_barrier_in_time_and_memory(k: int, n: int) -> None:
    interleaved, _, peaks = _run(k, n, Costs())
    # the same microbatches behind a loss barrier: fill then drain, every microbatch's activations held at once
    placement = Placement(k, 2)
    barrier = lower(build_timetable(placement, n), placement, n, True)
    fill_drain = simulate(barrier, placement, n, Costs())
    assert interleaved < fill_drain.makespan
    # every rank holds at most K + 1 of the step's 2N microbatches (K - s for its stage s of each replica)
    assert max(peaks.values()) <= min(k + 1, 2 * n) / (2 * n) <= max(fill_drain.peak_activations.values()) == 1.0


def test_activation_memory_per_rank_k4_n4() -> None:
    # rank r holds replica A's stage r (at most 4 - r microbatches) and B's stage 3 - r (at most r + 1): at most
    # 5 of the step's 8 microbatches, where fill-drain holds all 8
    _, _, peaks = _run(4, 4, Costs())
    assert peaks == {0: 5 / 8, 1: 5 / 8, 2: 5 / 8, 3: 5 / 8}


def test_microbatches_cut_cmp_step_time_with_f1_b2() -> None:
    # K=4 (ideal 3.0): 4 interleaved microbatches per replica take 3.5 where gpipe with the same microbatch
    # size (8 per step) takes 4.125 and cmp without microbatches 6.0 (test_simulate)
    assert _run(4, 4, Costs())[0] == pytest.approx(3.5)
    placement = Placement(4)
    assert simulate(lower(gpipe(4, 8), placement, 8, False), placement, 8).makespan == pytest.approx(4.125)


def test_only_cmp_with_microbatches_computes_the_loss_per_microbatch() -> None:
    assert get_schedule("cmp").loss_per_microbatch(2)
    assert not get_schedule("cmp").loss_per_microbatch(1)
    assert not get_schedule("gpipe").loss_per_microbatch(4)
    assert not get_schedule("mp").loss_per_microbatch(2)


def test_an_order_built_for_measured_costs_is_never_slower_under_them() -> None:
    rng = random.Random(0)
    faster = 0
    for _ in range(40):
        k, n = rng.choice([3, 4, 5, 6, 8]), rng.choice([2, 4, 8])
        forward = [rng.uniform(0.5, 2.0) for _ in range(k)]
        backward = [f * rng.uniform(1.2, 2.5) for f in forward]
        placement, costs = Placement(k, 2), Costs(forward, backward)
        tables = [cmp(k, n, placement, stage_costs=(forward, backward)), cmp(k, n, placement)]
        programs = [lower(table, placement, n, True, loss_per_microbatch=True) for table in tables]
        tuned, plain = (simulate(program, placement, n, costs).makespan for program in programs)
        assert tuned <= plain + 1e-9, (k, n)
        faster += tuned < plain - 1e-9
    assert faster >= 5  # and it often helps
