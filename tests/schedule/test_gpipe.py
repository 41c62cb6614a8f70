"""Golden timetables and pinned step times of the GPipe baseline."""

from __future__ import annotations

import importlib

import pytest

from lightning_cmp.schedule import Placement, gpipe, lower, render, simulate, validate

GOLDEN = {
    (2, 2): """
slot    0     1     2     3     4     5
rank 0: FA0   FA0.1 .     .     BA0.1 BA0
rank 1: .     FA1   FA1.1 BA1.1 BA1   .
""",
    (2, 4): """
slot    0     1     2     3     4     5     6     7     8     9
rank 0: FA0   FA0.1 FA0.2 FA0.3 .     .     BA0.3 BA0.2 BA0.1 BA0
rank 1: .     FA1   FA1.1 FA1.2 FA1.3 BA1.3 BA1.2 BA1.1 BA1   .
""",
    (3, 2): """
slot    0     1     2     3     4     5     6     7
rank 0: FA0   FA0.1 .     .     .     .     BA0.1 BA0
rank 1: .     FA1   FA1.1 .     .     BA1.1 BA1   .
rank 2: .     .     FA2   FA2.1 BA2.1 BA2   .     .
""",
    (3, 4): """
slot    0     1     2     3     4     5     6     7     8     9     10    11
rank 0: FA0   FA0.1 FA0.2 FA0.3 .     .     .     .     BA0.3 BA0.2 BA0.1 BA0
rank 1: .     FA1   FA1.1 FA1.2 FA1.3 .     .     BA1.3 BA1.2 BA1.1 BA1   .
rank 2: .     .     FA2   FA2.1 FA2.2 FA2.3 BA2.3 BA2.2 BA2.1 BA2   .     .
""",
}


@pytest.mark.parametrize(("num_stages", "num_microbatches"), sorted(GOLDEN))
def test_golden_timetable(num_stages: int, num_microbatches: int) -> None:
    assert render(gpipe(num_stages, num_microbatches)) == GOLDEN[num_stages, num_microbatches].strip("\n")


def test_module_docstring_shows_the_k2_m4_timetable() -> None:
    module = importlib.import_module("lightning_cmp.schedule.gpipe")
    assert f"```text\n{render(gpipe(2, 4))}\n```" in (module.__doc__ or "")


# Forward 1, backward 2 per whole batch: a microbatch slot costs 1/M or 2/M, and the fill-drain pipeline
# runs M + K - 1 slots of each kind on the critical path, so the step takes (M + K - 1) * 3 / M.
@pytest.mark.parametrize(
    ("num_stages", "num_microbatches", "makespan"),
    [(2, 1, 6.0), (2, 2, 4.5), (2, 4, 3.75), (2, 8, 3.375), (3, 2, 6.0), (3, 4, 4.5), (4, 4, 5.25), (8, 8, 5.625)],
)
def test_simulated_step_time(num_stages: int, num_microbatches: int, makespan: float) -> None:
    placement = Placement(num_stages)
    program = lower(gpipe(num_stages, num_microbatches), placement, num_microbatches, average_gradients=False)
    validate(program, placement, num_microbatches)
    result = simulate(program, placement, num_microbatches)
    assert result.makespan == pytest.approx(makespan)
    assert result.makespan == pytest.approx((num_microbatches + num_stages - 1) * 3 / num_microbatches)
    # the bubble: (K-1) / (M+K-1) of every rank's time is idle
    expected_idle = (num_stages - 1) / (num_microbatches + num_stages - 1)
    assert all(idle == pytest.approx(expected_idle) for idle in result.idle_fraction.values())
