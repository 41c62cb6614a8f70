"""Pinned simulator numbers: mp 3K, cmp 1.5K for even K (2.0x), 1.5K + 1.5 for odd K (loss barrier)."""

from __future__ import annotations

import pytest

from lightning_cmp.errors import CMPConfigError, ScheduleError
from lightning_cmp.schedule import DEFAULT_COSTS, Costs, Kind, Placement, cmp, lower, mp, simulate
from lightning_cmp.schedule.lower import Program


def run_mp(k: int, m: int = 1, costs: Costs = DEFAULT_COSTS) -> float:
    return simulate(lower(mp(k, m), Placement(k), m, True), Placement(k), m, costs).makespan


def run_cmp(k: int, m: int = 1, costs: Costs = DEFAULT_COSTS) -> float:
    placement = Placement(k, 2)
    return simulate(lower(cmp(k, m), placement, m, True), placement, m, costs).makespan


@pytest.mark.parametrize("k", range(1, 9))
def test_mp_makespan_is_3k(k: int) -> None:
    assert run_mp(k) == 3 * k


@pytest.mark.parametrize("k", [2, 4, 6, 8])
def test_cmp_even_k_is_twice_as_fast(k: int) -> None:
    assert run_cmp(k) == 1.5 * k
    assert run_mp(k) / run_cmp(k) == 2.0


# Odd K: B waits one forward slot (0.5) and one backward slot (1.0) on the middle rank. By hand, K=5:
# forwards end at 3.0 (B's last forward is 0.5 late), backwards take 5 + 1 (the middle rank runs BA2 then BB2).
@pytest.mark.parametrize(("k", "makespan"), [(3, 6.0), (5, 9.0), (7, 12.0)])
def test_cmp_odd_k(k: int, makespan: float) -> None:
    assert run_cmp(k) == makespan


def test_cmp_k3_spans_and_idle() -> None:
    placement = Placement(3, 2)
    result = simulate(lower(cmp(3), placement, 1, True), placement, 1)
    assert [(str(s.action), s.start, s.end) for s in result.spans[1]] == [
        ("F.A1.m0", 0.5, 1.0), ("F.B1.m0", 1.0, 1.5), ("B.A1.m0", 3.0, 4.0), ("B.B1.m0", 4.0, 5.0)
    ]  # fmt: skip
    assert result.busy == {0: 3.0, 1: 3.0, 2: 3.0}
    assert result.idle_fraction == {0: 0.5, 1: 0.5, 2: 0.5}


def test_microbatches_shrink_compute() -> None:
    assert run_mp(2, 2) == 4.5  # fill-drain: M + K - 1 = 3 forward slots of 0.5, then 3 backward slots of 1.0
    assert run_mp(1, 4) == 3.0


def test_costs_per_stage_send_output_and_average() -> None:
    assert run_mp(2, costs=Costs(forward=[1.0, 3.0], backward=[2.0, 6.0])) == 12.0
    assert run_mp(2, costs=Costs(send=0.25)) == 6.5
    assert run_mp(2, costs=Costs(output=1.0)) == 7.0
    assert run_cmp(2, costs=Costs(average=0.5)) == 3.5  # the last exchange starts at 3.0
    with pytest.raises(CMPConfigError, match="2 per-stage costs for num_stages=3"):
        run_mp(3, costs=Costs(forward=[1.0, 1.0]))


def test_deadlock_marks_where_each_rank_waits() -> None:
    program: Program = lower(mp(2), Placement(2), 1, average_gradients=False)
    program[0] = [program[0][2], *program[0][:2], *program[0][3:]]  # OUTPUT before the forward it needs
    with pytest.raises(ScheduleError, match="deadlock") as info:
        simulate(program, Placement(2), 1)
    message = str(info.value)
    assert "rank 0 waits at OUTPUT.A1.m0; rank 1 waits at RECV_ACT.A0.m0<-0" in message
    assert ">>OUTPUT.A1.m0<<" in message and ">>RECV_ACT.A0.m0<-0<<" in message


def test_wait_average_blocks_until_the_mirror_starts() -> None:
    placement = Placement(2, 2)
    program = lower(cmp(2), placement, 1, True)
    program[1] = [a for a in program[1] if not (a.kind is Kind.AVERAGE and a.stage == 1)]
    with pytest.raises(ScheduleError, match="rank 0 waits at WAIT_AVERAGE"):
        simulate(program, placement, 1)
