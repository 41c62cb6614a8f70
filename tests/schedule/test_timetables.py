"""Golden timetables of mp and cmp, laid out as they render."""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Callable

import pytest

from lightning_cmp.errors import ScheduleError
from lightning_cmp.schedule import Placement, Timetable, cmp, mp, render

GOLDEN = {
    ("mp", 2): """
slot    0   1   2   3
rank 0: FA0 .   .   BA0
rank 1: .   FA1 BA1 .
""",
    ("mp", 3): """
slot    0   1   2   3   4   5
rank 0: FA0 .   .   .   .   BA0
rank 1: .   FA1 .   .   BA1 .
rank 2: .   .   FA2 BA2 .   .
""",
    ("mp", 4): """
slot    0   1   2   3   4   5   6   7
rank 0: FA0 .   .   .   .   .   .   BA0
rank 1: .   FA1 .   .   .   .   BA1 .
rank 2: .   .   FA2 .   .   BA2 .   .
rank 3: .   .   .   FA3 BA3 .   .   .
""",
    ("cmp", 2): """
slot    0   1   2   3
rank 0: FA0 FB1 BB1 BA0
rank 1: FB0 FA1 BA1 BB0
""",
    # odd K: A and B want rank 1 in slot 1 (forward) and slot 5 (backward); A goes first both times
    ("cmp", 3): """
slot    0   1   2   3   4   5   6   7
rank 0: FA0 .   .   FB2 BB2 .   BA0 .
rank 1: .   FA1 FB1 .   .   BA1 BB1 .
rank 2: FB0 .   FA2 .   BA2 .   .   BB0
""",
    ("cmp", 4): """
slot    0   1   2   3   4   5   6   7
rank 0: FA0 .   .   FB3 BB3 .   .   BA0
rank 1: .   FA1 FB2 .   .   BB2 BA1 .
rank 2: .   FB1 FA2 .   .   BA2 BB1 .
rank 3: FB0 .   .   FA3 BA3 .   .   BB0
""",
}
SCHEDULES = {"mp": mp, "cmp": cmp}


@pytest.mark.parametrize(("name", "num_stages"), sorted(GOLDEN))
def test_golden_timetable(name: str, num_stages: int) -> None:
    assert render(SCHEDULES[name](num_stages)) == GOLDEN[name, num_stages].strip("\n")


def test_mp_microbatches_fill_then_drain_in_reverse() -> None:
    assert render(mp(2, num_microbatches=2)) == textwrap.dedent("""\
        slot    0     1     2     3     4     5
        rank 0: FA0   FA0.1 .     .     BA0.1 BA0
        rank 1: .     FA1   FA1.1 BA1.1 BA1   .""")


@pytest.mark.parametrize("name", ["mp", "cmp"])
def test_module_docstring_shows_the_current_k4_timetable(name: str) -> None:
    # the package re-exports the functions under the module names, so fetch the module itself
    module = importlib.import_module(f"lightning_cmp.schedule.{name}")
    schedule: Callable[[int], Timetable] = SCHEDULES[name]
    assert f"```text\n{render(schedule(4))}\n```" in (module.__doc__ or "")


def test_all_ranks_have_equal_length() -> None:
    for k in range(1, 9):
        assert len({len(slots) for slots in cmp(k, 3).values()}) == 1


def test_placement_that_does_not_fit_is_rejected() -> None:
    with pytest.raises(ScheduleError, match="num_replicas=2"):
        cmp(4, placement=Placement(4, num_replicas=1))
    with pytest.raises(ScheduleError, match="num_microbatches=0"):
        mp(2, num_microbatches=0)
