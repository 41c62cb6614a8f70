"""The asynchronous 1F1B schedule as data: its order, weight versions, rendering, validation and steady state."""

from __future__ import annotations

import pytest

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule import (
    Action,
    Kind,
    Placement,
    async_1f1b,
    drain_actions,
    get_schedule,
    lower_async,
    render_async,
    simulate,
    slot_actions,
    steady_state,
    validate,
    weight_versions,
)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_programs_and_timetables_are_valid(k: int, n: int) -> None:
    validate(lower_async(k, n), Placement(k), n, loss_barrier=False)
    validate(async_1f1b(k, n), Placement(k), n, loss_barrier=False)
    simulate(lower_async(k, n), Placement(k), 1)  # no deadlock


@pytest.mark.parametrize("k", [2, 3, 4])
def test_stage_k_warms_up_with_k_minus_stage_minus_one_forwards_then_alternates(k: int) -> None:
    n = 2 * k
    for rank in range(k):
        compute = [a for a in lower_async(k, n)[rank] if a.kind.is_compute]
        warmup = k - rank - 1
        assert [a.kind for a in compute[:warmup]] == [Kind.FORWARD] * warmup
        steady = compute[warmup : 2 * n - warmup]
        assert [a.kind for a in steady] == [Kind.FORWARD, Kind.BACKWARD] * (n - warmup)
        # at most K - stage mini-batches in flight on stage `rank`
        held = peak = 0
        for a in compute:
            held += 1 if a.kind is Kind.FORWARD else -1
            peak = max(peak, held)
        assert peak == k - rank


def test_the_last_stage_sends_every_output_and_computes_the_loss_in_the_same_step() -> None:
    assert [str(a) for a in slot_actions(3, 2, 4)] == [
        "RECV_ACT.A1.m4<-1",
        "F.A2.m4",
        "SEND_OUT.A2.m4->0",
        "SEND_OUT.A2.m4->1",
        "LOSS.A2.m4",
        "B.A2.m4",
        "SEND_GRAD.A2.m4->1",
    ]
    assert [str(a) for a in slot_actions(3, 0, 4)][-1] == "RECV_OUT.A2.m4<-2"
    assert [[str(a) for a in u] for u in drain_actions(3, 0, 4)] == [
        ["RECV_GRAD.A1.m2<-1", "B.A0.m2"],
        ["RECV_GRAD.A1.m3<-1", "B.A0.m3"],
    ]


def test_weight_versions_by_hand_for_three_stages() -> None:
    # stage 0 of 3: forward of mini-batch j after max(0, j-2) updates, backward after j
    table = {
        p: [tuple(map(str, weight_versions(3, 0, j, p))) for j in range(4)] for p in ("current", "stash", "predict")
    }
    assert table == {
        "current": [("0", "0"), ("0", "1"), ("0", "2"), ("1", "3")],
        "stash": [("0", "0"), ("0", "0"), ("0", "0"), ("1", "1")],
        # SpecTrain: s = floor(k/2) + K - k - 1 = 2 forward, floor(k/2) = 0 backward
        "predict": [("0+2", "0"), ("0+2", "1"), ("0+2", "2"), ("1+2", "3")],
    }
    assert [tuple(map(str, weight_versions(3, 2, j, "predict"))) for j in range(2)] == [("0+1", "0+1"), ("1+1", "1+1")]


def test_rendering_shows_each_pass_with_its_weight_version() -> None:
    expected = """
step    0         1         2         3         drain 1   drain 2
rank 0: F0@0      F1@0      F2@0 B0@0 F3@1 B1@0 B2@0      B3@1
rank 1: F0@0      F1@0 B0@0 F2@1 B1@0 F3@2 B2@1 B3@2
rank 2: F0@0 B0   F1@1 B1   F2@2 B2   F3@3 B3
"""
    assert render_async(3, 4, "stash") == expected.strip("\n")


@pytest.mark.parametrize("k", [2, 3])
def test_no_rank_is_idle_in_the_steady_state_when_outputs_arrive_in_time(k: int) -> None:
    # forward 1, backward 2 per stage: one mini-batch every 3 time units, the last stage's busy time
    state = steady_state(([1.0] * k, [2.0] * k))
    assert state.seconds_per_batch == pytest.approx(3.0)
    assert max(state.idle_fraction.values()) == pytest.approx(0.0, abs=1e-9)
    # mp takes K * 3 per mini-batch: the asynchronous pipeline is K times faster
    mp = get_schedule("mp").simulate(1, ([1.0] * k, [2.0] * k)).makespan
    assert mp / state.seconds_per_batch == pytest.approx(k)


def test_past_k_3_every_rank_waits_for_the_output_its_loss_needs() -> None:
    # K forwards of 1 must finish before rank 0's step ends: K=4 takes 4 per mini-batch, not 3
    state = steady_state(([1.0] * 4, [2.0] * 4))
    assert state.seconds_per_batch == pytest.approx(4.0)
    assert state.idle_fraction[3] == pytest.approx(0.25)


def test_validation_catches_an_output_that_is_never_received() -> None:
    program = lower_async(2, 2)
    program[0] = [a for a in program[0] if not (a.kind is Kind.RECV_OUT and a.microbatch == 1)]
    with pytest.raises(ScheduleError, match=r"rank 0 receives the output of microbatch 1 0 times"):
        validate(program, Placement(2), 2, loss_barrier=False)
    program = lower_async(2, 1)
    program[0].append(Action(Kind.SEND_OUT, 0, 1, 0, 1))
    with pytest.raises(ScheduleError, match=r"outputs go from rank 1"):
        validate(program, Placement(2), 1, loss_barrier=False)


def test_registered_asynchronous_schedules() -> None:
    assert {n: get_schedule(n).weights for n in ("spectrain", "pipedream", "async")} == {
        "spectrain": "predict",
        "pipedream": "stash",
        "async": "current",
    }
    assert not get_schedule("cmp").asynchronous and get_schedule("spectrain").asynchronous
    # simulate() runs N mini-batches fed one per step plus the drain: 2 stages, 6 batches, 3 per batch + fill
    assert get_schedule("pipedream").simulate(6, ([1.0, 1.0], [2.0, 2.0])).makespan == pytest.approx(21.0)
