"""Projected step time of ``torch.distributed.pipelining``'s schedules from measured per-stage costs.

The benchmark compares our schedules with torch's ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``, ``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV`` on ``K`` ranks. `torch_order`
gives each rank's compute order as torch runs it; `simulate_order` times that order under the cost conventions
of `lightning_cmp.schedule.simulate`: ``forward[s]``/``backward[s]`` are the whole-batch costs of virtual stage
``s``, one microbatch costs ``cost / num_microbatches``, a message arrives ``send`` after it is sent, sends never
block and a rank idles only while it waits for a dependency.

Placements (`stage_rank`): GPipe and 1F1B run one stage per rank (``K`` stages); Interleaved1F1B runs two
stages per rank placed loop-style (stage ``v`` on rank ``v % K``); ZBV and DualPipeV run two stages per rank
placed V-style (rank ``r`` holds stages ``r`` and ``2K-1-r``, so stages ``K-1`` and ``K`` share the last rank and
pass activations without a message). To compare one model across schedules, give every schedule the same
per-rank totals: a two-stage-per-rank schedule gets half a rank's cost per virtual stage (`even_costs`).

Not modelled: compute/communication overlap inside DualPipeV's ``OVERLAP_F_B`` actions (torch's default runtime
runs the two sub-actions one after the other, and so does this simulation), blocking sends, gradient reduction
and the optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

__all__ = [
    "SCHEDULES",
    "Op",
    "OpKind",
    "TorchSim",
    "even_costs",
    "num_virtual_stages",
    "simulate_order",
    "stage_rank",
    "torch_order",
]

OpKind = Literal["F", "B", "I", "W"]

#: torch's class name -> (stages per rank, placement style)
_LAYOUT: dict[str, tuple[int, str]] = {
    "ScheduleGPipe": (1, "loop"),
    "Schedule1F1B": (1, "loop"),
    "ScheduleInterleaved1F1B": (2, "loop"),
    "ScheduleZBVZeroBubble": (2, "v"),
    "ScheduleDualPipeV": (2, "v"),
}

#: The torch schedules this module projects, by class name.
SCHEDULES: tuple[str, ...] = tuple(_LAYOUT)

_KINDS: frozenset[str] = frozenset({"F", "B", "I", "W"})


@dataclass(frozen=True)
class Op:
    """One compute action: ``kind`` of global virtual ``stage`` on ``microbatch``.

    ``kind`` is ``"F"`` (forward), ``"B"`` (full backward), ``"I"`` (backward for the input only) or ``"W"``
    (weight-gradient backward). ``str(op)`` uses torch's notation, e.g. ``3F1`` for stage 3's forward of
    microbatch 1.
    """

    kind: OpKind
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


@dataclass(frozen=True)
class TorchSim:
    """Outcome of `simulate_order`.

    Attributes:
        makespan: Time when the last rank finishes its last op.
        busy: Per rank, the total time spent computing.
        peak_activations: Per rank, the most stage-microbatches held at once, each weighted
            ``1 / num_microbatches`` (a fraction of the batch, in units of one virtual stage's activations). A
            stage-microbatch is held from the start of its forward until the end of its full backward ``B``, or
            with the input/weight split until the end of its ``W``.
        idle_fraction: Per rank, ``1 - busy / makespan``.
        spans: Per rank, ``(op, start, end)`` of every op in the order it ran.
    """

    makespan: float
    busy: dict[int, float]
    peak_activations: dict[int, float]
    idle_fraction: dict[int, float] = field(default_factory=dict)
    spans: dict[int, list[tuple[Op, float, float]]] = field(default_factory=dict)


def _canonical(name: str) -> str:
    """torch's class name for ``name`` (``"ScheduleZBVZeroBubble"``, ``"ZBVZeroBubble"``, case-insensitive)."""
    key = name.lower().removeprefix("schedule")
    for cls in _LAYOUT:
        if cls.lower().removeprefix("schedule") == key:
            return cls
    raise ValueError(f"unknown torch schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def _check_ranks(num_ranks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be at least 1, got {num_ranks}")


def num_virtual_stages(name: str, num_ranks: int) -> int:
    """Number of virtual stages ``name`` splits the model into on ``num_ranks`` ranks.

    Args:
        name: A torch schedule, by class name (``"Schedule1F1B"``) or short name (``"1F1B"``).
        num_ranks: Pipeline ranks ``K``.

    Returns:
        ``K`` for GPipe and 1F1B, ``2K`` for Interleaved1F1B, ZBV and DualPipeV.

    Examples:
        >>> num_virtual_stages("Schedule1F1B", 4), num_virtual_stages("ScheduleZBVZeroBubble", 4)
        (4, 8)
    """
    _check_ranks(num_ranks)
    return _LAYOUT[_canonical(name)][0] * num_ranks


def stage_rank(name: str, num_ranks: int, stage: int) -> int:
    """Rank that holds virtual ``stage`` under ``name``'s placement.

    Args:
        name: A torch schedule, by class name or short name.
        num_ranks: Pipeline ranks ``K``.
        stage: Global virtual stage index, ``0 <= stage < num_virtual_stages(name, num_ranks)``.

    Returns:
        ``stage`` for one stage per rank; ``stage % K`` for Interleaved1F1B (loop style); ``stage`` or
        ``2K - 1 - stage`` for ZBV and DualPipeV (V style).

    Raises:
        ValueError: If ``stage`` is out of range.

    Examples:
        >>> [stage_rank("ScheduleInterleaved1F1B", 2, s) for s in range(4)]
        [0, 1, 0, 1]
        >>> [stage_rank("ScheduleDualPipeV", 2, s) for s in range(4)]
        [0, 1, 1, 0]
    """
    stages = num_virtual_stages(name, num_ranks)
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is out of range for {_canonical(name)} on {num_ranks} ranks ({stages} stages)")
    if _LAYOUT[_canonical(name)][1] == "loop":
        return stage % num_ranks
    return stage if stage < num_ranks else 2 * num_ranks - 1 - stage


def even_costs(
    name: str, num_ranks: int, forward: float = 1.0, backward: float = 2.0
) -> tuple[list[float], list[float]]:
    """Per-virtual-stage whole-batch costs of a uniform model whose every rank computes ``forward``/``backward``.

    Args:
        name: A torch schedule, by class name or short name.
        num_ranks: Pipeline ranks ``K``.
        forward: Whole-batch forward time of one rank's share of the model.
        backward: Whole-batch backward time of one rank's share of the model.

    Returns:
        ``(forward, backward)`` lists, one entry per virtual stage: a two-stage-per-rank schedule gets half of
        each per stage, so every schedule runs the same model.

    Examples:
        >>> even_costs("ScheduleInterleaved1F1B", 1)
        ([0.5, 0.5], [1.0, 1.0])
    """
    per_rank = _LAYOUT[_canonical(name)][0]
    stages = num_virtual_stages(name, num_ranks)
    return [forward / per_rank] * stages, [backward / per_rank] * stages


def _single_stage_order(cls: str, num_ranks: int, num_microbatches: int) -> dict[int, list[Op]]:
    """The order ``_step_microbatches`` of torch's single-stage GPipe and 1F1B runs on each rank.

    GPipe: every forward, then every backward, both in microbatch order. 1F1B: rank ``r`` runs
    ``min(K - r - 1, M)`` warm-up forwards, then alternates one forward and one backward until every
    microbatch is forwarded, then runs the remaining backwards (torch writes this as ``min(M, K - r)`` forwards
    followed by backward-first pairs: the same sequence).
    """
    m = num_microbatches
    order: dict[int, list[Op]] = {}
    for rank in range(num_ranks):
        ops: list[Op] = []
        if cls == "ScheduleGPipe":
            ops += [Op("F", rank, i) for i in range(m)] + [Op("B", rank, i) for i in range(m)]
        else:
            warmup = min(num_ranks - rank - 1, m)
            ops += [Op("F", rank, i) for i in range(warmup)]
            for i in range(warmup, m):
                ops += [Op("F", rank, i), Op("B", rank, i - warmup)]
            ops += [Op("B", rank, i) for i in range(m - warmup, m)]
        order[rank] = ops
    return order


def _torch_schedule(cls: str, num_ranks: int, num_microbatches: int) -> Any:
    """torch's schedule object built by its own ``__init__`` on stand-in stages (no process group needed).

    The stand-ins carry only what the constructors read: ``num_stages``, ``group_size``, ``group_rank``,
    ``submod`` and the ``stage_index_to_group_rank`` they set. torch's own argument checks run, so a refused
    combination raises here.
    """
    from torch.distributed.pipelining import schedules

    per_rank, _ = _LAYOUT[cls]
    stages = [
        SimpleNamespace(
            num_stages=per_rank * num_ranks,
            group_size=num_ranks,
            group_rank=0,
            submod=None,
            stage_index_to_group_rank=None,
        )
        for _ in range(per_rank)
    ]
    schedule_cls = getattr(schedules, cls)
    try:
        return schedule_cls(stages[0] if per_rank == 1 else stages, num_microbatches)
    except (ValueError, AssertionError) as err:
        raise ValueError(
            f"torch's {cls} refuses num_ranks={num_ranks}, num_microbatches={num_microbatches}: {err}"
        ) from err


def _to_op(action: Any) -> Op:
    kind = action.computation_type.value
    if kind not in _KINDS:  # pragma: no cover - compute actions are F, B, I or W
        raise ValueError(f"unexpected torch compute action {action}")
    return Op(kind, int(action.stage_index), int(action.microbatch_index))


def torch_order(name: str, num_ranks: int, num_microbatches: int) -> dict[int, list[Op]]:
    """Each rank's compute order under torch's schedule ``name``, as torch's runtime executes it.

    Interleaved1F1B, ZBV and DualPipeV come straight from torch: the schedule class is constructed by its own
    ``__init__`` on stand-in stage objects (so no process group is needed and torch's own argument checks run),
    which computes ``pipeline_order`` with ``_calculate_single_rank_operations`` (Interleaved1F1B through
    ``_get_1f1b_rank_ops``) and lowers it with ``_prepare_schedule_with_comms``; this function reads
    ``pipeline_order_with_comms``, the list ``_PipelineScheduleRuntime._step_microbatches`` iterates, keeping the
    compute actions and expanding each ``OVERLAP_F_B`` into its forward then its backward (the order torch runs
    them without a custom overlap function). GPipe and 1F1B are single-stage schedules whose
    ``_step_microbatches`` is a hand-written loop; their order is that loop's well-known order (GPipe: all
    forwards, then all backwards; 1F1B: ``min(K - r - 1, M)`` warm-up forwards on rank ``r``, one-forward
    one-backward steady state, cool-down backwards), and torch's constructor still checks the arguments. (torch
    2.14's ``Schedule1F1B._get_pipeline_order`` is only a visualisation IR, and it is wrong on the last rank: it
    starts that rank at microbatch 1 and forwards a nonexistent microbatch ``M``.)

    Args:
        name: A torch schedule, by class name (``"ScheduleZBVZeroBubble"``) or short name (``"ZBVZeroBubble"``).
        num_ranks: Pipeline ranks ``K``.
        num_microbatches: Microbatches ``M`` per step.

    Returns:
        rank -> the ops it computes, in order; stages are global virtual stage indices (see `stage_rank`).

    Raises:
        ValueError: If ``name`` is unknown, or torch refuses the combination. torch 2.14 requires
            ``M >= K`` for 1F1B, ``M >= 2K`` for DualPipeV and, for Interleaved1F1B, ``M`` a multiple of
            ``max(1, M // K)``; GPipe and ZBV take any ``M >= 1``.

    Examples:
        >>> [str(op) for op in torch_order("Schedule1F1B", 2, 3)[0]]
        ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
        >>> [str(op) for op in torch_order("ScheduleZBVZeroBubble", 1, 1)[0]]
        ['0F0', '1F0', '1I0', '1W0', '0I0', '0W0']
    """
    cls = _canonical(name)
    _check_ranks(num_ranks)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
    schedule = _torch_schedule(cls, num_ranks, num_microbatches)
    if _LAYOUT[cls][0] == 1:
        return _single_stage_order(cls, num_ranks, num_microbatches)
    order: dict[int, list[Op]] = {}
    for rank in range(num_ranks):
        ops: list[Op] = []
        for action in schedule.pipeline_order_with_comms[rank]:
            if action.computation_type.value == "OVERLAP_F_B":
                ops += [_to_op(sub) for sub in action.sub_actions]
            elif action.computation_type.value in _KINDS:
                ops.append(_to_op(action))
        order[rank] = ops
    return order


def _check_order(order: Mapping[int, Sequence[Op]], cls: str, num_ranks: int, num_microbatches: int) -> None:
    """Raise ValueError unless every stage-microbatch has one F and one full backward (B, or I then W)."""
    stages = num_virtual_stages(cls, num_ranks)
    if set(order) != set(range(num_ranks)):
        raise ValueError(f"order has ranks {sorted(order)}; expected 0..{num_ranks - 1}")
    seen: dict[tuple[str, int, int], int] = {}
    for rank, ops in order.items():
        for op in ops:
            if op.kind not in _KINDS or not 0 <= op.stage < stages or not 0 <= op.microbatch < num_microbatches:
                raise ValueError(
                    f"rank {rank}: invalid op {op!r} for {stages} stages and {num_microbatches} microbatches"
                )
            if stage_rank(cls, num_ranks, op.stage) != rank:
                raise ValueError(f"rank {rank} runs {op}, but {cls} places stage {op.stage} on another rank")
            key = (op.kind, op.stage, op.microbatch)
            if key in seen:
                raise ValueError(f"{op} appears twice")
            seen[key] = rank
    for s in range(stages):
        for m in range(num_microbatches):
            has = {kind for kind in _KINDS if (kind, s, m) in seen}
            if has not in ({"F", "B"}, {"F", "I", "W"}):
                raise ValueError(f"stage {s} microbatch {m} has ops {sorted(has)}; expected F and B, or F, I and W")


def _dependencies(op: Op, last_stage: int) -> list[Op | tuple[Op, Op]]:
    """Ops ``op`` waits for; a pair means either one (a full or an input-only backward of the next stage)."""
    s, m = op.stage, op.microbatch
    if op.kind == "F":
        return [Op("F", s - 1, m)] if s > 0 else []
    if op.kind == "W":
        return [Op("I", s, m)]
    if s == last_stage:
        return [Op("F", s, m)]
    return [Op("F", s, m), (Op("B", s + 1, m), Op("I", s + 1, m))]


def simulate_order(
    order: Mapping[int, Sequence[Op]],
    name: str,
    num_ranks: int,
    num_microbatches: int,
    forward: Sequence[float],
    backward: Sequence[float],
    send: float = 0.0,
    input_fraction: float = 0.5,
) -> TorchSim:
    """Event simulation of per-rank compute orders (e.g. from `torch_order`) with whole-batch stage costs.

    Each rank runs its ops in order, each as soon as the rank is free and its inputs are there: ``F`` of stage
    ``s`` needs ``F`` of ``s - 1``; ``B``/``I`` of ``s`` needs ``B`` or ``I`` of ``s + 1`` (on the last stage,
    its own ``F``); ``W`` needs ``I`` of the same stage and microbatch. A dependency computed on another rank
    arrives ``send`` after it ends; sends never block.

    Args:
        order: rank -> ops in the order that rank runs them.
        name: The torch schedule the order belongs to (its placement, see `stage_rank`).
        num_ranks: Pipeline ranks ``K``.
        num_microbatches: Microbatches ``M``; one microbatch's op costs the stage's cost divided by ``M``.
        forward: Whole-batch forward time of each virtual stage.
        backward: Whole-batch full-backward time of each virtual stage.
        send: Latency of one message between ranks.
        input_fraction: Share of the backward that ``I`` costs; ``W`` costs the rest.

    Returns:
        The step's `TorchSim`.

    Raises:
        ValueError: If the costs do not match the stage count, or the order is not one complete step
            (each stage-microbatch: one ``F`` and ``B``, or ``F``, ``I`` and ``W``, on the rank holding the stage).
        RuntimeError: If the ranks deadlock; the message names each stuck rank's next op.

    Examples:
        >>> order = torch_order("ScheduleGPipe", 2, 2)
        >>> simulate_order(order, "ScheduleGPipe", 2, 2, forward=[1.0, 1.0], backward=[2.0, 2.0]).makespan
        4.5
    """
    cls = _canonical(name)
    stages = num_virtual_stages(cls, num_ranks)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
    if len(forward) != stages or len(backward) != stages:
        raise ValueError(
            f"{cls} on {num_ranks} ranks has {stages} stages, got {len(forward)} forward and {len(backward)} "
            "backward costs; give one each"
        )
    if not 0.0 <= input_fraction <= 1.0:
        raise ValueError(f"input_fraction must be in [0, 1], got {input_fraction}")
    _check_order(order, cls, num_ranks, num_microbatches)

    share = 1.0 / num_microbatches
    cost = {
        "F": [f * share for f in forward],
        "B": [b * share for b in backward],
        "I": [b * share * input_fraction for b in backward],
        "W": [b * share * (1.0 - input_fraction) for b in backward],
    }
    done: dict[Op, float] = {}  # op -> end time
    pc = dict.fromkeys(order, 0)
    clock = dict.fromkeys(order, 0.0)
    held = dict.fromkeys(order, 0.0)
    peak = dict.fromkeys(order, 0.0)
    spans: dict[int, list[tuple[Op, float, float]]] = {rank: [] for rank in order}

    def ready(rank: int, op: Op) -> float | None:
        """When ``op``'s inputs are on ``rank``, or None while one is not computed yet."""
        at = 0.0
        for dep in _dependencies(op, stages - 1):
            options = dep if isinstance(dep, tuple) else (dep,)
            found = next((d for d in options if d in done), None)
            if found is None:
                return None
            latency = send if stage_rank(cls, num_ranks, found.stage) != rank else 0.0
            at = max(at, done[found] + latency)
        return at

    while any(pc[r] < len(order[r]) for r in order):
        moved = False
        for rank, ops in order.items():
            while pc[rank] < len(ops):
                op = ops[pc[rank]]
                at = ready(rank, op)
                if at is None:
                    break
                start = max(clock[rank], at)
                end = start + cost[op.kind][op.stage]
                if op.kind == "F":
                    held[rank] += share
                    peak[rank] = max(peak[rank], held[rank])
                elif op.kind in ("B", "W"):
                    held[rank] -= share
                clock[rank], done[op] = end, end
                spans[rank].append((op, start, end))
                pc[rank] += 1
                moved = True
        if not moved:
            stuck = "; ".join(f"rank {r} waits at {order[r][pc[r]]}" for r in order if pc[r] < len(order[r]))
            raise RuntimeError(f"deadlock in {cls} order: no rank can progress ({stuck})")

    makespan = max(clock.values(), default=0.0)
    busy = {rank: sum(end - start for _, start, end in spans[rank]) for rank in order}
    idle = {rank: 1.0 - busy[rank] / makespan if makespan else 0.0 for rank in order}
    return TorchSim(makespan, busy, peak, idle, spans)
