"""partition="bipartition" keeps separate cuts only where the chosen schedule simulates faster with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_cmp.partition import Chain, trace_chain
from lightning_cmp.runtime import plan as plan_module

# Per-block forward seconds (backward twice that) for which separate cuts shorten a 3-stage cmp step
FORWARD = [3.0, 5.0, 3.0, 2.0, 2.0, 3.0]


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "profile_blocks", lambda chain, x: [(f, 2 * f) for f in FORWARD])
    monkeypatch.setattr(plan_module, "profile_replay", lambda chain, x: [(0.1, 1000, 0)] * len(FORWARD))


def _chain() -> Chain:
    return trace_chain(nn.Sequential(*[nn.Linear(2, 2) for _ in FORWARD]))


def test_separate_cuts_are_kept_where_the_schedule_gains(measured: None) -> None:
    plan = plan_module._plan("bipartition", _chain(), torch.zeros(1, 2), 3, 1e-6, "cmp", 1)
    assert (plan.forward_cuts, plan.cuts) == ([3, 4], [1, 3])
    assert plan.note.startswith("bipartition: simulated step 36.25 s with separate cuts, 39 s with layer-wise")
    assert plan.stage_costs is not None and plan.costs is not None
    assert plan.costs.move[0] == pytest.approx(0.1 + 1000 * 1e-6)  # replay + the recording's transfer


def test_layer_wise_cuts_are_kept_where_the_split_only_adds(measured: None) -> None:
    # mp runs one stage at a time: the replays only add to the step
    plan = plan_module._plan("bipartition", _chain(), torch.zeros(1, 2), 3, 1e-6, "mp", 1)
    assert plan.forward_cuts == plan.cuts == [1, 3]
    assert plan.note.startswith("bipartition kept layer-wise cuts for mp: simulated step")


def test_an_explicit_pair_is_used_as_given() -> None:
    pair = {"forward": [4, 5], "backward": [2, 5]}
    plan = plan_module._plan(pair, _chain(), torch.zeros(1, 2), 3, None, "gpipe", 4)
    assert (plan.forward_cuts, plan.cuts, plan.stage_costs) == ([4, 5], [2, 5], None)


def test_the_transfer_probe_needs_two_ranks() -> None:
    from lightning_cmp.runtime import Comm

    assert plan_module.seconds_per_byte(Comm([0], 0, torch.device("cpu"))) is None
