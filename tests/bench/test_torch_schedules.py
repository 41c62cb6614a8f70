"""Projection of torch.distributed.pipelining's schedules: orders taken from torch, timed by our conventions."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from lightning_cmp.bench.torch_schedules import (
    SCHEDULES,
    Op,
    even_costs,
    num_virtual_stages,
    simulate_order,
    stage_rank,
    torch_order,
)

#: (K, M) pairs every schedule accepts (DualPipeV needs M >= 2K)
CASES = [(2, 4), (3, 6), (4, 8)]


class _RecordingStage:
    """Stands in for a ``_PipelineStageBase``: no communication, records the compute calls torch makes."""

    def __init__(self, index: int, num_stages: int, num_ranks: int, rank: int, log: list[Op]) -> None:
        self.stage_index, self.num_stages = index, num_stages
        self.group_size, self.group_rank = num_ranks, rank
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.submod = None
        self.stage_index_to_group_rank: dict[int, int] | None = None
        self.has_backward = False
        self.log = log

    def get_fwd_recv_ops(self, mb: int) -> list[object]:
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def forward_one_chunk(self, mb: int, *args: object, **kwargs: object) -> None:
        self.log.append(Op("F", self.stage_index, mb))

    def backward_one_chunk(self, mb: int, loss: object = None, full_backward: bool = True, **kwargs: object) -> None:
        self.log.append(Op("B" if full_backward else "I", self.stage_index, mb))

    def backward_weight_one_chunk(self, mb: int, **kwargs: object) -> None:
        self.log.append(Op("W", self.stage_index, mb))

    def set_local_fwd_input(self, *args: object) -> None:
        pass

    set_local_bwd_input = perform_reduce_grad = set_local_fwd_input

    def get_local_bwd_output(self, mb: int) -> None:
        return None

    def clear_runtime_states(self) -> None:
        pass


def _executed(name: str, k: int, m: int) -> dict[int, list[Op]]:
    """Run torch's own ``_step_microbatches`` on every rank with recording stages: the order torch executes."""
    cls = getattr(torch_schedules, name)
    out: dict[int, list[Op]] = {}
    for rank in range(k):
        log: list[Op] = []
        held = [s for s in range(num_virtual_stages(name, k)) if stage_rank(name, k, s) == rank]
        stages = [_RecordingStage(s, num_virtual_stages(name, k), k, rank, log) for s in held]
        schedule = cls(stages[0] if len(stages) == 1 else stages, m)
        if len(stages) == 1:
            schedule._stage_forward_initialized = True  # skip shape inference (it needs a process group)
        else:
            schedule._stages_forward_initialized = True
        schedule._step_microbatches([()] * m, [{}] * m)
        out[rank] = log
    return out


def _torch_pipeline_order(name: str, k: int, m: int) -> tuple[dict[int, list[Op]], dict[int, int]]:
    """Compute ops of torch's ``pipeline_order`` IR (no idle slots, overlaps expanded) and its stage -> rank map."""
    cls = getattr(torch_schedules, name)
    per_rank = num_virtual_stages(name, k) // k
    stages = [_RecordingStage(s, per_rank * k, k, 0, []) for s in range(per_rank)]
    schedule = cls(stages[0] if per_rank == 1 else stages, m)
    order: dict[int, list[Op]] = {}
    for rank, actions in schedule.pipeline_order.items():
        flat = [a for action in actions if action is not None for a in (action.sub_actions or (action,))]
        kinds = {"F", "B", "I", "W"}
        ops = [a for a in flat if a.computation_type.value in kinds]
        order[rank] = [Op(a.computation_type.value, a.stage_index, a.microbatch_index) for a in ops]
    mapping = getattr(schedule, "stage_index_to_group_rank", {s: s for s in range(k)})
    return order, mapping


def _uniform(name: str, k: int, m: int, **kwargs: float) -> float:
    forward, backward = even_costs(name, k)
    return simulate_order(torch_order(name, k, m), name, k, m, forward, backward, **kwargs).makespan


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("k", "m"), [*CASES, (4, 12)])
def test_order_is_what_torch_executes(name: str, k: int, m: int) -> None:
    assert torch_order(name, k, m) == _executed(name, k, m)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("k", "m"), CASES)
def test_order_matches_torch_pipeline_order_and_placement(name: str, k: int, m: int) -> None:
    ours = torch_order(name, k, m)
    ir, mapping = _torch_pipeline_order(name, k, m)
    # torch 2.14's Schedule1F1B IR starts its last rank at microbatch 1 (a visualisation-only bug; the
    # execution test above covers that rank), so compare the other ranks for it
    ranks = range(k - 1) if name == "Schedule1F1B" else range(k)
    assert {r: ours[r] for r in ranks} == {r: ir[r] for r in ranks}
    assert {s: stage_rank(name, k, s) for s in range(num_virtual_stages(name, k))} == mapping


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("k", "m"), CASES)
def test_every_op_runs_once_on_its_rank(name: str, k: int, m: int) -> None:
    order = torch_order(name, k, m)
    runs = Counter((op.kind, op.stage, op.microbatch) for ops in order.values() for op in ops)
    assert max(runs.values()) == 1
    assert all(stage_rank(name, k, op.stage) == rank for rank, ops in order.items() for op in ops)
    for s in range(num_virtual_stages(name, k)):
        for mb in range(m):
            kinds = {kind for kind in "FBIW" if (kind, s, mb) in runs}
            assert kinds in ({"F", "B"}, {"F", "I", "W"})
    forward, backward = even_costs(name, k)
    sim = simulate_order(order, name, k, m, forward, backward)
    assert sum(sim.busy.values()) == pytest.approx(sum(forward) + sum(backward))
    assert all(len(sim.spans[r]) == len(order[r]) for r in order)


@pytest.mark.parametrize("name", ["ScheduleGPipe", "Schedule1F1B"])
@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 2), (4, 4), (4, 8), (3, 16)])
def test_gpipe_and_1f1b_fill_and_drain(name: str, k: int, m: int) -> None:
    forward, backward = [1.0] * k, [2.0] * k
    sim = simulate_order(torch_order(name, k, m), name, k, m, forward, backward)
    assert sim.makespan == pytest.approx((m + k - 1) / m * 3.0)
    assert sim.busy == pytest.approx(dict.fromkeys(range(k), 3.0))


def test_send_latency_counts_once_per_hop_each_way() -> None:
    k, m, send = 3, 4, 0.25
    assert _uniform("ScheduleGPipe", k, m, send=send) == pytest.approx((m + k - 1) / m * 3.0 + 2 * (k - 1) * send)
    # the V placement keeps stages K-1 and K on the last rank: only 2(K-1) hops each way
    assert _uniform("ScheduleZBVZeroBubble", 1, 2, send=send) == _uniform("ScheduleZBVZeroBubble", 1, 2)


@pytest.mark.parametrize("k", [2, 4])
def test_zero_bubble_beats_1f1b_at_two_microbatches_per_rank(k: int) -> None:
    m = 2 * k
    assert _uniform("ScheduleZBVZeroBubble", k, m) < _uniform("Schedule1F1B", k, m)
    assert _uniform("ScheduleInterleaved1F1B", k, m) < _uniform("Schedule1F1B", k, m)


def test_dualpipev_runs() -> None:
    k, m = 4, 8
    order = torch_order("ScheduleDualPipeV", k, m)
    assert {op.kind for ops in order.values() for op in ops} == {"F", "B", "I", "W"}
    forward, backward = even_costs("ScheduleDualPipeV", k)
    sim = simulate_order(order, "ScheduleDualPipeV", k, m, forward, backward)
    assert 3.0 < sim.makespan < _uniform("Schedule1F1B", k, m)
    assert sim.busy == pytest.approx(dict.fromkeys(range(k), 3.0))


@pytest.mark.parametrize(("k", "m"), [(2, 2), (3, 3), (2, 6), (4, 8)])
def test_1f1b_rank0_holds_k_microbatches(k: int, m: int) -> None:
    sim = simulate_order(torch_order("Schedule1F1B", k, m), "Schedule1F1B", k, m, [1.0] * k, [2.0] * k)
    assert sim.peak_activations[0] == pytest.approx(min(k, m) / m)
    assert sim.peak_activations[k - 1] == pytest.approx(1 / m)
    gpipe = simulate_order(torch_order("ScheduleGPipe", k, m), "ScheduleGPipe", k, m, [1.0] * k, [2.0] * k)
    assert gpipe.peak_activations == pytest.approx(dict.fromkeys(range(k), 1.0))


def test_split_backward_holds_activations_until_w() -> None:
    order = {0: [Op("F", 0, 0), Op("F", 1, 0), Op("I", 1, 0), Op("I", 0, 0), Op("W", 1, 0), Op("W", 0, 0)]}
    sim = simulate_order(order, "ScheduleZBVZeroBubble", 1, 1, [1.0, 1.0], [2.0, 2.0], input_fraction=0.25)
    assert sim.peak_activations == {0: 2.0}
    assert sim.makespan == pytest.approx(6.0)
    assert [(str(op), start) for op, start, _ in sim.spans[0]][-2:] == [("1W0", 3.0), ("0W0", 4.5)]


@pytest.mark.parametrize(
    ("name", "k", "m", "match"),
    [
        ("Schedule1F1B", 4, 3, "Schedule1F1B refuses num_ranks=4, num_microbatches=3"),
        ("ScheduleDualPipeV", 4, 7, "ScheduleDualPipeV refuses"),
        ("ScheduleInterleaved1F1B", 2, 7, "multiple of the number of rounds"),
        ("ScheduleLoopedBFS", 2, 2, "unknown torch schedule"),
        ("ScheduleGPipe", 2, 0, "num_microbatches must be at least 1"),
    ],
)
def test_refused_combinations(name: str, k: int, m: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        torch_order(name, k, m)


def test_short_names_and_bad_inputs() -> None:
    assert torch_order("zbvzerobubble", 2, 2) == torch_order("ScheduleZBVZeroBubble", 2, 2)
    order = torch_order("GPipe", 2, 2)
    with pytest.raises(ValueError, match="2 stages, got 1 forward"):
        simulate_order(order, "GPipe", 2, 2, [1.0], [2.0])
    with pytest.raises(ValueError, match="places stage 1 on another rank"):
        simulate_order({0: order[1], 1: order[0]}, "GPipe", 2, 2, [1.0] * 2, [2.0] * 2)
    with pytest.raises(ValueError, match="stage 1 microbatch 1 has ops"):
        simulate_order({0: order[0], 1: order[1][:-1]}, "GPipe", 2, 2, [1.0] * 2, [2.0] * 2)


def test_deadlock_names_the_stuck_ops() -> None:
    order = {0: [Op("B", 0, 0), Op("F", 0, 0)], 1: [Op("F", 1, 0), Op("B", 1, 0)]}
    with pytest.raises(RuntimeError, match=r"deadlock.*rank 0 waits at 0B0; rank 1 waits at 1F0"):
        simulate_order(order, "ScheduleGPipe", 2, 1, [1.0] * 2, [2.0] * 2)
