"""The schedules by name: what ``strategy=CMPStrategy(schedule=...)`` looks up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from lightning_cmp.errors import unknown_name
from lightning_cmp.schedule.asynchronous import async_1f1b, lower_async
from lightning_cmp.schedule.cmp import cmp
from lightning_cmp.schedule.gpipe import gpipe
from lightning_cmp.schedule.mp import mp
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.timetable import Schedule, StageCosts, Timetable

if TYPE_CHECKING:
    from lightning_cmp.schedule.simulate import SimResult

__all__ = ["SCHEDULES", "ScheduleSpec", "get_schedule"]


@dataclass(frozen=True)
class ScheduleSpec:
    """A named schedule: the timetable function, how many replicas it trains, and what it is."""

    name: str
    build: Schedule
    num_replicas: int
    description: str
    default_microbatches: int = 1
    interleaves: bool = False  # with microbatches: 1F1B order, so the loss is computed per microbatch
    #: the same schedule ordered for measured per-stage costs (None: the order does not depend on costs)
    build_for_costs: Callable[[int, int, Placement, StageCosts], Timetable] | None = None
    #: asynchronous 1F1B across training steps with this weight policy (`schedule.asynchronous`); None: every
    #: training step is one synchronous pass of the pipeline
    weights: str | None = None

    @property
    def asynchronous(self) -> bool:
        return self.weights is not None

    def loss_per_microbatch(self, num_microbatches: int) -> bool:
        """Whether the runtime computes the loss per microbatch (no loss barrier) at this microbatch count."""
        return self.interleaves and num_microbatches > 1

    def timetable(
        self, num_stages: int, num_microbatches: int, placement: Placement, stage_costs: StageCosts | None = None
    ) -> Timetable:
        """The timetable of one step; ordered for ``stage_costs`` (per-stage whole-batch forward and backward
        times) where the schedule's order depends on them.

        Examples:
            >>> spec = get_schedule("cmp")
            >>> table = spec.timetable(2, 2, spec.placement(2), stage_costs=([1.0, 1.0], [2.0, 2.0]))
            >>> len(table[0])
            8
        """
        if stage_costs is not None and self.build_for_costs is not None:
            return self.build_for_costs(num_stages, num_microbatches, placement, stage_costs)
        return self.build(num_stages, num_microbatches, placement)

    def placement(self, num_stages: int) -> Placement:
        """The placement this schedule runs on with ``num_stages`` ranks."""
        return Placement(num_stages, self.num_replicas)

    def simulate(
        self, num_microbatches: int, stage_costs: StageCosts, average: float = 0.0, ordered: bool = True
    ) -> SimResult:
        """One step simulated from per-stage whole-batch (forward, backward) times, as the runtime would run it:
        ordered for those costs where the order depends on them (unless ``ordered`` is False), lowered, then
        timed; ``average``: the time of one stage's copy averaging.

        Examples:
            >>> get_schedule("mp").simulate(1, ([1.0, 1.0], [2.0, 2.0])).makespan
            6.0
        """
        from lightning_cmp.schedule.lower import lower
        from lightning_cmp.schedule.simulate import Costs, simulate

        forward, backward = stage_costs
        placement = self.placement(len(forward))
        if self.asynchronous:  # ``num_microbatches`` whole mini-batches fed one per step, then the drain
            costs = Costs(forward, backward, average=average)
            return simulate(lower_async(len(forward), num_microbatches), placement, 1, costs)
        table = self.timetable(len(forward), num_microbatches, placement, stage_costs if ordered else None)
        program = lower(
            table, placement, num_microbatches, self.num_replicas == 2, self.loss_per_microbatch(num_microbatches)
        )
        return simulate(program, placement, num_microbatches, Costs(forward, backward, average=average))


#: Adding a schedule is one entry here.
SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ScheduleSpec("mp", mp, 1, "plain model parallelism: one replica, one rank busy at a time"),
            ScheduleSpec(
                "cmp",
                cmp,
                2,
                "cross model parallelism: two replicas, the second placed in reverse; with microbatches both "
                "directions interleave 1F1B-style",
                interleaves=True,
                build_for_costs=lambda k, n, placement, costs: cmp(k, n, placement, stage_costs=costs),
            ),
            ScheduleSpec(
                "gpipe", gpipe, 1, "GPipe: one replica, M microbatches, fill then drain", default_microbatches=4
            ),
            ScheduleSpec(
                "spectrain",
                async_1f1b,
                1,
                "SpecTrain: asynchronous 1F1B on whole mini-batches, each stage's weights predicted from its momentum",
                weights="predict",
            ),
            ScheduleSpec(
                "pipedream",
                async_1f1b,
                1,
                "PipeDream: asynchronous 1F1B on whole mini-batches, the forward's weights stashed for the backward",
                weights="stash",
            ),
            ScheduleSpec(
                "async",
                async_1f1b,
                1,
                "asynchronous 1F1B on whole mini-batches with whatever weights are current (stale baseline)",
                weights="current",
            ),
        )
    }
)


def get_schedule(name: str) -> ScheduleSpec:
    """The spec registered as ``name``; a miss raises ``CMPConfigError`` listing the valid names.

    Examples:
        >>> spec = get_schedule("cmp")
        >>> spec.num_replicas, len(spec.build(4, 1, spec.placement(4))[0])
        (2, 8)
    """
    if name not in SCHEDULES:
        raise unknown_name("schedule", name, SCHEDULES)
    return SCHEDULES[name]
