"""Tests for Bi-Partition: separate forward and backward cuts (exact against brute force, layer-wise
equivalence, never worse than balanced cuts, cost on 500-block chains, and the errors)."""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_right
from collections.abc import Sequence

import pytest

from lightning_cmp.errors import PartitionError
from lightning_cmp.partition import (
    BlockCosts,
    balanced_cuts,
    bipartition_cuts,
    bipartition_loads,
    check_bipartition_cuts,
    imbalance,
    measured_costs,
    stage_costs,
)
from lightning_cmp.partition import bipartition as bipartition_module

# ---- a reference model, written per block, independent of the module's prefix sums


def _reference_loads(costs: BlockCosts, forward: tuple[int, ...], backward: tuple[int, ...]) -> list[float]:
    loads = [0.0] * (len(forward) + 1)
    recompute = costs.forward if costs.recompute is None else costs.recompute
    for block in range(costs.num_blocks):
        fw, bw = bisect_right(forward, block), bisect_right(backward, block)
        loads[fw] += costs.forward[block]
        loads[bw] += costs.backward[block]
        if fw != bw:
            loads[bw] += min(costs.move[block], recompute[block]) + costs.weight_sync[block]
    return loads


def _neighbours_only(forward: Sequence[int], backward: Sequence[int]) -> bool:
    return all(max(forward[i], backward[i]) <= min(forward[i + 1], backward[i + 1]) for i in range(len(forward) - 1))


def _brute_force(costs: BlockCosts, num_stages: int, forbidden: dict[int, str], forward_ahead: bool = False) -> float:
    """The least bottleneck over every pair of cut lists obeying the neighbour constraint (and, with
    ``forward_ahead``, forward cuts never before backward cuts)."""
    allowed = [c for c in range(1, costs.num_blocks) if c not in forbidden]
    options = list(itertools.combinations(allowed, num_stages - 1))
    return min(
        max(_reference_loads(costs, fw, bw))
        for fw in options
        for bw in options
        if _neighbours_only(fw, bw) and (not forward_ahead or all(f >= b for f, b in zip(fw, bw, strict=True)))
    )


def _random_costs(rng: random.Random, num_blocks: int, values: list[float]) -> BlockCosts:
    def draw() -> list[float]:
        return [rng.choice(values) for _ in range(num_blocks)]

    return BlockCosts(draw(), draw(), move=draw(), weight_sync=draw(), recompute=draw() if rng.random() < 0.5 else None)


def _random_case(rng: random.Random, values: list[float]) -> tuple[BlockCosts, int, dict[int, str]]:
    num_blocks = rng.randint(1, 8)
    forbidden = {c: "shared weights" for c in range(1, num_blocks) if rng.random() < 0.2}
    num_stages = rng.randint(1, min(4, num_blocks - len(forbidden)))
    return _random_costs(rng, num_blocks, values), num_stages, forbidden


def _check_solution(costs: BlockCosts, num_stages: int, forbidden: dict[int, str]) -> float:
    forward, backward = bipartition_cuts(costs, num_stages, forbidden)
    assert check_bipartition_cuts(forward, backward, costs.num_blocks, num_stages, forbidden) == (forward, backward)
    loads = bipartition_loads(costs, forward, backward)
    assert loads == pytest.approx(_reference_loads(costs, tuple(forward), tuple(backward)))
    return max(loads)


def test_matches_brute_force_with_integer_costs_zeros_and_forbidden_cuts() -> None:
    rng = random.Random(0)
    for _ in range(400):
        costs, num_stages, forbidden = _random_case(rng, [0.0, 0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
        # Integer costs: every sum is exact, so the optimum must match exactly.
        assert _check_solution(costs, num_stages, forbidden) == _brute_force(costs, num_stages, forbidden), (
            costs,
            num_stages,
            forbidden,
        )


def test_forward_ahead_matches_brute_force_and_keeps_its_direction() -> None:
    rng = random.Random(3)
    for _ in range(300):
        costs, num_stages, forbidden = _random_case(rng, [0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
        forward, backward = bipartition_cuts(costs, num_stages, forbidden, forward_ahead=True)
        assert all(f >= b for f, b in zip(forward, backward, strict=True)), (forward, backward)
        check_bipartition_cuts(forward, backward, costs.num_blocks, num_stages, forbidden, forward_ahead=True)
        assert max(bipartition_loads(costs, forward, backward)) == _brute_force(costs, num_stages, forbidden, True)


def test_forward_ahead_refuses_a_zone_run_the_other_way() -> None:
    with pytest.raises(PartitionError, match=r"forward_cuts\[0\]=2 < backward_cuts\[0\]=3: blocks 2..2 .* worker 1"):
        check_bipartition_cuts([2], [3], num_blocks=5, num_stages=2, forward_ahead=True)


def test_measured_costs_charge_what_the_runtime_moves() -> None:
    costs = measured_costs([(1.0, 2.0), (3.0, 6.0)], [(0.1, 1000, 200), (0.2, 0, 0)], seconds_per_byte=1e-3)
    assert costs.forward == (1.0, 3.0) and costs.backward == (2.0, 6.0)
    assert costs.extra(0) == pytest.approx(0.1 + 1.0 + 0.2)  # replay + recording moved + weights sent back
    assert costs.extra(1) == pytest.approx(0.2)
    with pytest.raises(PartitionError, match="2 blocks of forward/backward times but 1 replay"):
        measured_costs([(1.0, 2.0), (3.0, 6.0)], [(0.1, 1, 1)], 1e-3)


def test_no_zone_of_split_blocks_is_needless() -> None:
    # Each zone of split blocks in the answer is there because no layer-wise cut in its place keeps the optimum.
    rng = random.Random(6)
    for _ in range(200):
        costs, num_stages, forbidden = _random_case(rng, [0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
        forward, backward = bipartition_cuts(costs, num_stages, forbidden)
        bottleneck = max(bipartition_loads(costs, forward, backward))
        for k in (k for k in range(num_stages - 1) if forward[k] != backward[k]):
            for cut in range(min(forward[k], backward[k]), max(forward[k], backward[k]) + 1):
                fw, bw = [*forward[:k], cut, *forward[k + 1 :]], [*backward[:k], cut, *backward[k + 1 :]]
                if cut in forbidden or not (_increasing(fw) and _increasing(bw) and _neighbours_only(fw, bw)):
                    continue
                assert max(bipartition_loads(costs, fw, bw)) > bottleneck, (costs, num_stages, forward, backward, cut)


def _increasing(cuts: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(cuts))


def test_matches_brute_force_with_real_costs() -> None:
    rng = random.Random(1)
    for _ in range(150):
        costs, num_stages, forbidden = _random_case(rng, [0.0, *(rng.uniform(0, 3) for _ in range(8))])
        best = _brute_force(costs, num_stages, forbidden)
        assert _check_solution(costs, num_stages, forbidden) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_equal_cuts_give_the_layer_wise_loads() -> None:
    rng = random.Random(2)
    for _ in range(50):
        costs = _random_costs(rng, 12, [0.0, 0.5, 1.0, 2.5, 4.0])
        cuts = sorted(rng.sample(range(1, 12), 3))
        per_block = [f + b for f, b in zip(costs.forward, costs.backward, strict=True)]
        assert bipartition_loads(costs, cuts, cuts) == stage_costs(per_block, cuts)  # bit for bit


def test_never_worse_than_the_best_layer_wise_cuts() -> None:
    rng = random.Random(3)
    strictly_better = 0
    for _ in range(60):
        num_blocks, num_stages = rng.randint(2, 40), rng.randint(2, 6)
        num_stages = min(num_stages, num_blocks)
        costs = _random_costs(rng, num_blocks, [0.0, 0.1, 1.0, 3.0, 10.0, 30.0])
        per_block = [f + b for f, b in zip(costs.forward, costs.backward, strict=True)]
        layer_wise = max(stage_costs(per_block, balanced_cuts(per_block, num_stages)))
        best = max(bipartition_loads(costs, *bipartition_cuts(costs, num_stages)))
        assert best <= layer_wise * (1 + 1e-12)  # exact but for the last bits of differently ordered sums
        strictly_better += best < layer_wise * (1 - 1e-9)
    assert strictly_better > 10  # separate cuts do help on uneven chains


def test_costly_splits_fall_back_to_layer_wise_cuts() -> None:
    forward, backward = [1.0, 4.0, 1.0, 1.0, 6.0, 2.0], [2.0, 8.0, 2.0, 2.0, 12.0, 4.0]
    costs = BlockCosts(forward, backward, move=[1e6] * 6, weight_sync=[1e6] * 6)
    cuts = bipartition_cuts(costs, 3)
    per_block = [f + b for f, b in zip(forward, backward, strict=True)]
    assert cuts[0] == cuts[1]
    assert max(bipartition_loads(costs, *cuts)) == max(stage_costs(per_block, balanced_cuts(per_block, 3)))


def test_separate_cuts_balance_what_layer_wise_cuts_cannot() -> None:
    # Two workers, three equal blocks: layer-wise gives 3 | 6; splitting block 1's passes gives 5 | 4.
    costs = BlockCosts([1, 1, 1], [2, 2, 2], move=[0.5] * 3, weight_sync=[0.25] * 3)
    assert balanced_cuts([3, 3, 3], 2) == [1]
    forward, backward = bipartition_cuts(costs, 2)
    assert (forward, backward) == ([1], [2])
    assert bipartition_loads(costs, forward, backward) == [5.75, 4.0]  # worker 0 owns block 1: +0.5 +0.25
    assert imbalance(bipartition_loads(costs, forward, backward)) == pytest.approx(5.75 / 4.875)


def test_split_charges_go_to_the_backward_worker() -> None:
    costs = BlockCosts([1, 1, 1], [2, 2, 2], move=[3, 3, 3], recompute=[0.5, 0.5, 0.5], weight_sync=[0.1] * 3)
    # Block 1: forward on worker 0, backward on worker 1, which pays min(3, 0.5) + 0.1.
    assert bipartition_loads(costs, [2], [1]) == pytest.approx([4.0, 5.6])
    # Block 1: forward on worker 1, backward on worker 0.
    assert bipartition_loads(costs, [1], [2]) == pytest.approx([5.6, 4.0])


def test_zero_cost_chains() -> None:
    costs = BlockCosts([0.0] * 5, [0.0] * 5, move=[0.0] * 5, weight_sync=[0.0] * 5)
    forward, backward = bipartition_cuts(costs, 3)
    check_bipartition_cuts(forward, backward, 5, 3)
    assert bipartition_loads(costs, forward, backward) == [0.0, 0.0, 0.0]
    assert imbalance([0.0, 0.0]) == 1.0


def test_one_stage_and_one_cut_per_block() -> None:
    costs = BlockCosts([1, 2, 3], [2, 4, 6], move=[1] * 3, weight_sync=[1] * 3)
    assert bipartition_cuts(costs, 1) == ([], [])
    assert bipartition_cuts(costs, 3) == ([1, 2], [1, 2])  # no room for separate cuts


def test_forbidden_positions_hold_for_both_lists() -> None:
    rng = random.Random(4)
    costs = _random_costs(rng, 30, [0.0, 1.0, 2.0, 7.0, 20.0])
    forbidden = {c: "parameter 'w' is used by blocks 9 and 12" for c in range(10, 13)}
    forward, backward = bipartition_cuts(costs, 5, forbidden)
    assert not set(forward + backward) & set(forbidden)


def test_500_blocks_and_8_stages_take_few_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The solver's cost is (probes) x O(K n log n); count probes rather than time them.
    rng = random.Random(5)
    forward = [rng.uniform(0, 1) * rng.choice([1, 10, 100]) for _ in range(500)]
    backward = [2 * f * rng.uniform(0.5, 1.5) for f in forward]
    costs = BlockCosts(forward, backward, move=[rng.uniform(0, 1) for _ in range(500)], weight_sync=[0.01] * 500)
    probes: list[float] = []
    probe = bipartition_module._Chain.probe

    def counted(self: bipartition_module._Chain, limit: float, num_stages: int) -> tuple[list[int], list[int]] | None:
        probes.append(limit)
        return probe(self, limit, num_stages)

    monkeypatch.setattr(bipartition_module._Chain, "probe", counted)
    forward_cuts, backward_cuts = bipartition_cuts(costs, 8)
    assert len(probes) <= 64  # bisection to 1e-9 of the bottleneck, then a few exact steps
    assert imbalance(bipartition_loads(costs, forward_cuts, backward_cuts)) < 1.01
    per_block = [f + b for f, b in zip(forward, backward, strict=True)]
    assert imbalance(stage_costs(per_block, balanced_cuts(per_block, 8))) > imbalance(
        bipartition_loads(costs, forward_cuts, backward_cuts)
    )


# ---- bad input


def test_too_few_blocks() -> None:
    costs = BlockCosts([1.0] * 4, [1.0] * 4, move=[0.0] * 4, weight_sync=[0.0] * 4)
    with pytest.raises(PartitionError, match=r"num_stages=5 but the model has only 4 blocks .*use num_stages<=4"):
        bipartition_cuts(costs, 5)
    with pytest.raises(PartitionError, match=r"num_stages=0 .* use num_stages>=1"):
        bipartition_cuts(costs, 0)
    with pytest.raises(PartitionError, match=r"can be cut only at 1, 3, so 3 stage\(s\) at most.*num_stages<=3"):
        bipartition_cuts(costs, 4, forbidden={2: "parameter 'w' is used by blocks 1 and 2"})


def test_mismatched_cost_lists() -> None:
    with pytest.raises(
        PartitionError,
        match=r"BlockCosts got 3 forward, 3 backward, 2 move, 3 weight_sync values; give one value per block",
    ):
        BlockCosts([1.0] * 3, [1.0] * 3, move=[0.0] * 2, weight_sync=[0.0] * 3)
    with pytest.raises(PartitionError, match=r"4 recompute"):
        BlockCosts([1.0] * 3, [1.0] * 3, move=[0.0] * 3, weight_sync=[0.0] * 3, recompute=[0.0] * 4)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "1"])
def test_bad_cost_values(bad: float) -> None:
    with pytest.raises(PartitionError, match=r"weight_sync cost .* of block 1 must be a finite number >= 0 \(s"):
        BlockCosts([1.0] * 2, [1.0] * 2, move=[0.0] * 2, weight_sync=[0.0, bad])


def test_check_bipartition_cuts_errors() -> None:
    with pytest.raises(PartitionError, match=r"cuts 1 and 2 interleave: .* keep max\(forward_cuts\[i\]"):
        check_bipartition_cuts([2, 4], [5, 6], num_blocks=8, num_stages=3)
    check_bipartition_cuts([2, 5], [4, 6], num_blocks=8, num_stages=3)  # overlapping ranges are fine
    with pytest.raises(PartitionError, match=r"give different numbers of stages; give num_stages - 1 cuts in each"):
        check_bipartition_cuts([2, 5], [4], num_blocks=8, num_stages=3)
    with pytest.raises(PartitionError, match=r"partition=\[5, 4\] must be strictly increasing"):
        check_bipartition_cuts([2, 5], [5, 4], num_blocks=8, num_stages=3)
    with pytest.raises(PartitionError, match=r"cut 3 of partition=\[3\] puts blocks that share weights"):
        check_bipartition_cuts([2], [3], num_blocks=8, num_stages=2, forbidden={3: "tied"})
    with pytest.raises(PartitionError, match=r"imbalance\(\) needs at least one load"):
        imbalance([])
