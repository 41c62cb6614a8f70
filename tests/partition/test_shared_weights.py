"""A module used twice keeps its users in one stage: the policies never cut through shared weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_cmp.errors import PartitionError
from lightning_cmp.partition import Chain, profile_blocks, resolve_cuts, trace_chain
from tests.helpers.lit import LitCNN
from tests.strategy.test_setup_errors import _setup

torch.set_num_threads(1)


def _reused() -> nn.Sequential:
    """Seven blocks; the Linear of blocks 2 and 4 is one module called twice (cuts 3 and 4 would split it)."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 2))


def _chain() -> Chain:
    chain = trace_chain(_reused())
    assert chain.num_blocks == 7
    return chain


def test_forbidden_cuts_name_the_shared_weight() -> None:
    forbidden = _chain().forbidden_cuts()
    assert sorted(forbidden) == [3, 4]
    assert forbidden[3] == "parameter '2.weight' is used by blocks 2 and 4 ('2', '2#1')"
    assert trace_chain(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))).forbidden_cuts() == {}


@pytest.mark.parametrize("policy", ["balanced", "uniform"])
def test_policies_cut_only_where_nothing_is_shared(policy: str) -> None:
    # Equal costs: the unconstrained optimum (cut 3, and uniform's cut 4) splits the shared Linear.
    chain = _chain()
    cuts = resolve_cuts(policy, chain.num_blocks, 2, costs=[1.0] * 7, forbidden=chain.forbidden_cuts())
    assert cuts == [2]
    chain.check_cuts_share_nothing(cuts)  # what the pipeline checks on the first batch


def test_balanced_with_profiled_costs_builds_a_pipeline_split() -> None:
    chain = _chain()
    costs = [f + b for f, b in profile_blocks(chain, torch.randn(4, 8))]
    for num_stages in (2, 3, 4, 5):
        cuts = resolve_cuts("balanced", chain.num_blocks, num_stages, costs, chain.forbidden_cuts())
        assert not set(cuts) & {3, 4}, cuts
        chain.check_cuts_share_nothing(cuts)


def test_explicit_cut_through_shared_weights_is_refused_with_the_allowed_cuts() -> None:
    chain = _chain()
    message = (
        r"cut 3 of partition=\[3\] puts blocks that share weights in two stages: parameter '2.weight' is used by "
        r"blocks 2 and 4 \('2', '2#1'\); keep them in one stage: cuts may lie at 1\.\.2, 5\.\.6"
    )
    with pytest.raises(PartitionError, match=message):
        resolve_cuts([3], chain.num_blocks, 2, forbidden=chain.forbidden_cuts())
    with pytest.raises(PartitionError, match=r"parameter '2.weight' is used by stages 0 and 1 \(tied weights\)"):
        chain.check_cuts_share_nothing([3])


def test_too_many_stages_for_the_allowed_cuts() -> None:
    chain = _chain()
    message = (
        r"num_stages=6 but the model's 7 blocks can be cut only at 1\.\.2, 5\.\.6, so 5 stage\(s\) at most: cuts "
        r"3\.\.4 would split shared weights \(parameter '2.weight' .*\); use num_stages<=5, or stop sharing"
    )
    for policy in ("balanced", "uniform"):
        with pytest.raises(PartitionError, match=message):
            resolve_cuts(policy, chain.num_blocks, 6, costs=[1.0] * 7, forbidden=chain.forbidden_cuts())


class _ReusedLit(LitCNN):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*_reused()[:-1], nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, 0, 0, :8])  # block 0 is the indexing: the shared Linear is in blocks 3 and 5


def test_strategy_set_up_refuses_explicit_cuts_through_shared_weights() -> None:
    _setup(_ReusedLit(), partition=[3])
    with pytest.raises(PartitionError, match=r"cut 4 of partition=\[4\] puts blocks that share weights"):
        _setup(_ReusedLit(), partition=[4])
    with pytest.raises(
        PartitionError, match=r"num_stages=7 but the model's 8 blocks can be cut only at 1\.\.3, 6\.\.7"
    ):
        _setup(_ReusedLit(), devices=7)  # partition="balanced": checked with the allowed cuts at set-up
