"""Lowering inserts communication, OUTPUT collectives and averaging in the right places."""

from __future__ import annotations

from lightning_cmp.schedule import Action, Kind, Placement, cmp, lower, lower_forward_only, mp, split_phases


def streams(program: dict[int, list[Action]]) -> dict[int, list[str]]:
    return {rank: [str(a) for a in actions] for rank, actions in program.items()}


def test_mp_k2_program() -> None:
    assert streams(lower(mp(2), Placement(2), 1, average_gradients=False)) == {
        0: ["F.A0.m0", "SEND_ACT.A0.m0->1", "OUTPUT.A1.m0", "RECV_GRAD.A1.m0<-1", "B.A0.m0"],
        1: ["RECV_ACT.A0.m0<-0", "F.A1.m0", "OUTPUT.A1.m0", "B.A1.m0", "SEND_GRAD.A1.m0->0"],
    }


def test_one_replica_averages_with_the_other_pipelines_only() -> None:
    # data-parallel mp pipelines: each stage's single copy is averaged over the pipelines (peer: the rank itself)
    program = streams(lower(mp(2), Placement(2), 1, average_gradients=True))
    assert program[0][-3:] == ["B.A0.m0", "AVERAGE.A0.m0<->0", "WAIT_AVERAGE"]
    assert program[1][-3:] == ["SEND_GRAD.A1.m0->0", "AVERAGE.A1.m0<->1", "WAIT_AVERAGE"]


def test_cmp_k2_program_averages_after_each_last_backward() -> None:
    program = streams(lower(cmp(2), Placement(2, 2), 1, average_gradients=True))
    assert program[0] == [
        "F.A0.m0", "SEND_ACT.A0.m0->1", "RECV_ACT.B0.m0<-1", "F.B1.m0",
        "OUTPUT.A1.m0", "OUTPUT.B1.m0",
        "B.B1.m0", "SEND_GRAD.B1.m0->1", "AVERAGE.B1.m0<->1",
        "RECV_GRAD.A1.m0<-1", "B.A0.m0", "AVERAGE.A0.m0<->1",
        "WAIT_AVERAGE",
    ]  # fmt: skip


def test_cmp_odd_k_middle_rank_averages_once_after_the_later_copy() -> None:
    middle = lower(cmp(3, 2), Placement(3, 2), 2, average_gradients=True)[1]
    averages = [(i, a) for i, a in enumerate(middle) if a.kind is Kind.AVERAGE]
    assert [str(a) for _, a in averages] == ["AVERAGE.A1.m0<->1"]
    last_backward = max(i for i, a in enumerate(middle) if a.kind is Kind.BACKWARD)
    assert averages[0][0] == last_backward + 2  # after B.B1.m0 and its SEND_GRAD
    assert str(middle[-1]) == "WAIT_AVERAGE"


def test_no_averaging_without_flag() -> None:
    for program in (lower(cmp(4), Placement(4, 2), 1, False), lower(mp(4), Placement(4), 1, False)):
        kinds = {a.kind for actions in program.values() for a in actions}
        assert not kinds & {Kind.AVERAGE, Kind.WAIT_AVERAGE}


def test_outputs_in_canonical_order_on_every_rank() -> None:
    program = lower(cmp(3, 2), Placement(3, 2), 2, average_gradients=False)
    for actions in program.values():
        assert [str(a) for a in actions if a.kind is Kind.OUTPUT] == [
            "OUTPUT.A2.m0", "OUTPUT.A2.m1", "OUTPUT.B2.m0", "OUTPUT.B2.m1"
        ]  # fmt: skip


def test_forward_only_and_split_phases_agree() -> None:
    placement = Placement(4, 2)
    full = lower(cmp(4, 2), placement, 2, average_gradients=True)
    evaluation = lower_forward_only(cmp(4, 2), placement, 2)
    for rank, actions in full.items():
        forward, backward = split_phases(actions)
        assert forward == evaluation[rank]
        assert forward[-1].kind is Kind.OUTPUT
        assert {a.kind for a in backward} >= {Kind.BACKWARD, Kind.WAIT_AVERAGE}
        assert Kind.BACKWARD not in {a.kind for a in forward}
