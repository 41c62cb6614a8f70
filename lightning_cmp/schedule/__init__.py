"""When things happen: schedules as data, lowered to per-rank action streams, validated and simulated."""

from lightning_cmp.schedule.action import REPLICA_NAMES, Action, Kind
from lightning_cmp.schedule.asynchronous import (
    WEIGHT_POLICIES,
    SteadyState,
    Version,
    async_1f1b,
    drain_actions,
    lower_async,
    prediction_steps,
    render_async,
    slot_actions,
    steady_state,
    weight_versions,
)
from lightning_cmp.schedule.cmp import cmp
from lightning_cmp.schedule.gpipe import gpipe
from lightning_cmp.schedule.interleave import build_interleaved
from lightning_cmp.schedule.lower import Program, lower, lower_forward_only, split_phases
from lightning_cmp.schedule.mp import mp
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.registry import SCHEDULES, ScheduleSpec, get_schedule
from lightning_cmp.schedule.render import render, render_program
from lightning_cmp.schedule.simulate import DEFAULT_COSTS, Costs, SimResult, Span, simulate
from lightning_cmp.schedule.timetable import Schedule, StageCosts, Timetable, build_timetable
from lightning_cmp.schedule.validate import validate

__all__ = [
    "DEFAULT_COSTS",
    "REPLICA_NAMES",
    "SCHEDULES",
    "WEIGHT_POLICIES",
    "Action",
    "Costs",
    "Kind",
    "Placement",
    "Program",
    "Schedule",
    "ScheduleSpec",
    "SimResult",
    "Span",
    "StageCosts",
    "SteadyState",
    "Timetable",
    "Version",
    "async_1f1b",
    "build_interleaved",
    "build_timetable",
    "cmp",
    "drain_actions",
    "get_schedule",
    "gpipe",
    "lower",
    "lower_async",
    "lower_forward_only",
    "mp",
    "prediction_steps",
    "render",
    "render_async",
    "render_program",
    "simulate",
    "slot_actions",
    "split_phases",
    "steady_state",
    "validate",
    "weight_versions",
]
