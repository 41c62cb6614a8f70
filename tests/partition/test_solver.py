"""Tests for the pure-Python cut solver: uniform, balanced (against brute force), validation and messages."""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path

import pytest

from lightning_cmp.errors import CMPConfigError, PartitionError
from lightning_cmp.partition import solver
from lightning_cmp.partition.solver import (
    balanced_cuts,
    check_cuts,
    resolve_cuts,
    stage_costs,
    uniform_cuts,
)


def test_solver_imports_no_torch() -> None:
    tree = ast.parse(Path(solver.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning")]


@pytest.mark.parametrize(
    ("num_blocks", "num_stages", "cuts"),
    [(10, 3, [4, 7]), (9, 3, [3, 6]), (4, 4, [1, 2, 3]), (5, 1, []), (14, 4, [4, 8, 11])],
)
def test_uniform_cuts(num_blocks: int, num_stages: int, cuts: list[int]) -> None:
    assert uniform_cuts(num_blocks, num_stages) == cuts


def _brute_force(costs: list[float], num_stages: int) -> list[int]:
    def bottleneck(cuts: tuple[int, ...]) -> float:
        return max(stage_costs(costs, cuts))

    options = list(itertools.combinations(range(1, len(costs)), num_stages - 1))
    best = min(bottleneck(c) for c in options)
    return list(min(c for c in options if bottleneck(c) == best))


def test_balanced_cuts_match_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(300):
        num_blocks = rng.randint(1, 9)
        num_stages = rng.randint(1, num_blocks)
        costs = [float(rng.randint(0, 6)) for _ in range(num_blocks)]
        assert balanced_cuts(costs, num_stages) == _brute_force(costs, num_stages), (costs, num_stages)


def test_balanced_cuts_examples() -> None:
    assert balanced_cuts([1, 1, 1, 3], 2) == [3]
    assert balanced_cuts([0.0, 0.0, 0.0], 3) == [1, 2]
    assert stage_costs([5, 1, 1, 1, 1, 1], balanced_cuts([5, 1, 1, 1, 1, 1], 2)) == [5.0, 5.0]


def test_balanced_cuts_rejects_bad_costs() -> None:
    with pytest.raises(PartitionError, match=r"cost -1.0 of block 1 must be a finite number >= 0"):
        balanced_cuts([1.0, -1.0], 2)
    with pytest.raises(PartitionError, match="cost nan"):
        balanced_cuts([float("nan"), 1.0], 2)


@pytest.mark.parametrize(
    ("cuts", "num_blocks", "num_stages", "message"),
    [
        ([3], 12, 3, r"partition=\[3\] gives 2 stages but num_stages=3; give 2 cut indices"),
        ([5, 3], 12, 3, r"partition=\[5, 3\] must be strictly increasing"),
        ([3, 3], 12, 3, r"partition=\[3, 3\] must be strictly increasing"),
        ([3, 14], 12, 3, r"cut 14 is out of range: the model has 12 blocks, so cuts must lie in 1\.\.11"),
        ([0], 12, 2, r"cut 0 is out of range"),
        ([1.5], 12, 2, r"must hold ints"),
        ([1, 2, 3, 4], 4, 5, r"num_stages=5 but the model has only 4 blocks that can be cut; use num_stages<=4"),
    ],
)
def test_check_cuts_errors(cuts: list[int], num_blocks: int, num_stages: int, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        check_cuts(cuts, num_blocks, num_stages)


def test_too_few_blocks_everywhere() -> None:
    for call in (
        lambda: uniform_cuts(4, 5),
        lambda: balanced_cuts([1.0] * 4, 5),
        lambda: resolve_cuts("uniform", 4, 5),
    ):
        with pytest.raises(PartitionError, match=r"num_stages=5 but the model has only 4 blocks .* module=\.\.\."):
            call()
    with pytest.raises(PartitionError, match="num_stages=0"):
        uniform_cuts(4, 0)


def test_resolve_cuts() -> None:
    assert resolve_cuts("uniform", 6, 3) == [2, 4]
    assert resolve_cuts("balanced", 3, 2, costs=[4.0, 1.0, 1.0]) == [1]
    assert resolve_cuts((2, 4), 6, 3) == [2, 4]
    with pytest.raises(CMPConfigError, match="unknown partition 'balance'; valid: 'balanced', 'uniform'"):
        resolve_cuts("balance", 6, 3)
    with pytest.raises(PartitionError, match="needs per-block costs"):
        resolve_cuts("balanced", 6, 3)
    with pytest.raises(PartitionError, match="got 2 block costs but the model has 6 blocks"):
        resolve_cuts("balanced", 6, 3, costs=[1.0, 2.0])
