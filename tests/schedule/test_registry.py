"""The schedule registry: names, replica counts and helpful misses."""

from __future__ import annotations

import pytest

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.schedule import SCHEDULES, async_1f1b, cmp, get_schedule, gpipe, mp


def test_registered_schedules() -> None:
    assert {name: (spec.build, spec.num_replicas) for name, spec in SCHEDULES.items()} == {
        "mp": (mp, 1),
        "cmp": (cmp, 2),
        "gpipe": (gpipe, 1),
        "spectrain": (async_1f1b, 1),
        "pipedream": (async_1f1b, 1),
        "async": (async_1f1b, 1),
    }
    assert get_schedule("gpipe").default_microbatches == 4
    assert all(spec.description and "\n" not in spec.description for spec in SCHEDULES.values())
    assert get_schedule("cmp").placement(4).num_replicas == 2


def test_unknown_schedule_lists_the_valid_ones() -> None:
    with pytest.raises(
        CMPConfigError, match=r"unknown schedule 'cpm'; valid: 'async', 'cmp', 'gpipe', 'mp', 'pipedream', 'spectrain'"
    ):
        get_schedule("cpm")
