"""validate() accepts every schedule and rejects broken ones with the grid and the bad cell marked."""

from __future__ import annotations

import pytest

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule import Action, Kind, Placement, cmp, lower, mp, validate


def parse(streams: dict[int, list[str]]) -> dict[int, list[Action]]:
    return {rank: [Action.parse(text) for text in texts] for rank, texts in streams.items()}


MP2 = {
    0: ["F.A0.m0", "SEND_ACT.A0.m0->1", "OUTPUT.A1.m0", "RECV_GRAD.A1.m0<-1", "B.A0.m0"],
    1: ["RECV_ACT.A0.m0<-0", "F.A1.m0", "OUTPUT.A1.m0", "B.A1.m0", "SEND_GRAD.A1.m0->0"],
}


def test_hand_written_program_is_valid() -> None:
    validate(parse(MP2), Placement(2), 1)


def test_recv_without_send_is_named_and_marked_in_the_grid() -> None:
    broken = {0: [a for a in MP2[0] if not a.startswith("SEND_ACT")], 1: MP2[1]}
    with pytest.raises(ScheduleError) as info:
        validate(parse(broken), Placement(2), 1)
    message = str(info.value)
    assert "RECV_ACT.A0.m0<-0 at rank 1, step 0 has no matching SEND_ACT.A0.m0->1 on rank 0" in message
    assert ">>RECV_ACT.A0.m0<-0<<" in message
    assert "rank 0" in message and "rank 1" in message  # the grid


def test_send_without_recv() -> None:
    broken = {0: MP2[0], 1: [a for a in MP2[1] if not a.startswith("RECV_ACT")]}
    with pytest.raises(ScheduleError, match=r"SEND_ACT.A0.m0->1 at rank 0, step 1 has no matching"):
        validate(parse(broken), Placement(2), 1)


def test_wrong_peer() -> None:
    broken = {0: MP2[0], 1: ["RECV_ACT.A0.m0<-1", *MP2[1][1:]]}
    with pytest.raises(ScheduleError, match="expected on rank 1 with peer 0"):
        validate(parse(broken), Placement(2), 1)


def test_forward_on_the_wrong_rank() -> None:
    table = mp(2)
    table[0][1], table[1][1] = table[1][1], None
    with pytest.raises(ScheduleError, match="belongs on rank 1") as info:
        validate(table, Placement(2), 1)
    assert ">>FA1<<" in str(info.value)


def test_missing_and_duplicate_compute() -> None:
    table = mp(2)
    table[1][2] = None
    with pytest.raises(ScheduleError, match=r"1 compute action\(s\) never run: B.A1.m0"):
        validate(table, Placement(2), 1)
    table[1][2] = table[1][1]
    with pytest.raises(ScheduleError, match="runs twice"):
        validate(table, Placement(2), 1)


def test_timetable_dependency_order() -> None:
    table = mp(3)
    table[1][0], table[1][1] = table[1][1], None  # FA1 before FA0 finished
    with pytest.raises(ScheduleError, match=r"F.A1.m0 at rank 1, slot 0 runs before F.A0.m0") as info:
        validate(table, Placement(3), 1)
    assert "rank 1: >>FA1<<" in str(info.value)


def test_backward_before_all_outputs_breaks_the_loss_barrier() -> None:
    program = lower(cmp(2), Placement(2, 2), 1, average_gradients=False)
    stream = program[0]
    b = next(i for i, a in enumerate(stream) if a.kind is Kind.BACKWARD)
    stream.insert(4, stream.pop(b))  # B.B1 before the OUTPUTs
    with pytest.raises(ScheduleError, match="needs OUTPUT"):
        validate(program, Placement(2, 2), 1)


def test_output_order_must_match() -> None:
    program = lower(cmp(2), Placement(2, 2), 1, average_gradients=False)
    i = next(i for i, a in enumerate(program[1]) if a.kind is Kind.OUTPUT)
    program[1][i], program[1][i + 1] = program[1][i + 1], program[1][i]
    with pytest.raises(ScheduleError, match="OUTPUT order differs"):
        validate(program, Placement(2, 2), 1)


def test_forward_only_rejects_backward() -> None:
    with pytest.raises(ScheduleError, match="forward-only"):
        validate(mp(2), Placement(2), 1, forward_only=True)
