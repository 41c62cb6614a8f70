"""When things happen: schedules as data, lowered to per-rank action streams, validated and simulated."""

from lightning_cmp.schedule.action import REPLICA_NAMES, Action, Kind
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
    "Timetable",
    "build_interleaved",
    "build_timetable",
    "cmp",
    "get_schedule",
    "gpipe",
    "lower",
    "lower_forward_only",
    "mp",
    "render",
    "render_program",
    "simulate",
    "split_phases",
    "validate",
]
