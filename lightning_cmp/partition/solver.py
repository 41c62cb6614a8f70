"""Choose stage cuts over a chain of blocks: uniform, min-max balanced, or checked user cuts (pure Python)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import accumulate, pairwise

from lightning_cmp.errors import PartitionError, unknown_name

__all__ = [
    "POLICIES",
    "balanced_cuts",
    "check_cuts",
    "check_num_stages",
    "resolve_cuts",
    "stage_costs",
    "too_few_blocks",
    "uniform_cuts",
]

# Cuts: a sorted list of num_stages - 1 ints; cuts[i] is the first block of stage i + 1, so stage s runs
# blocks [bounds[s], bounds[s + 1]) with bounds = [0, *cuts, num_blocks].

POLICIES = ("uniform", "balanced")

#: Cut positions no stage may start at, each with the reason (blocks on both sides share a parameter); see
#: ``Chain.forbidden_cuts``.
Forbidden = Mapping[int, str]


def too_few_blocks(num_stages: int, num_blocks: int) -> PartitionError:
    """The error for asking for more stages than there are blocks.

    Examples:
        >>> str(too_few_blocks(5, 4)).split(";")[0]
        'num_stages=5 but the model has only 4 blocks that can be cut'
    """
    return PartitionError(
        f"num_stages={num_stages} but the model has only {num_blocks} blocks that can be cut; "
        f"use num_stages<={num_blocks} or pass module=... to split a deeper submodule"
    )


def check_num_stages(num_blocks: int, num_stages: int) -> None:
    """Raise ``PartitionError`` unless ``1 <= num_stages <= num_blocks``.

    Examples:
        >>> check_num_stages(4, 4)
        >>> check_num_stages(4, 5)
        Traceback (most recent call last):
        ...
        lightning_cmp.errors.PartitionError: num_stages=5 but the model has only 4 blocks that can be cut; ...
    """
    if num_stages < 1:
        raise PartitionError(f"num_stages={num_stages} but a model needs at least 1 stage; use num_stages>=1")
    if num_stages > num_blocks:
        raise too_few_blocks(num_stages, num_blocks)


def uniform_cuts(num_blocks: int, num_stages: int, forbidden: Forbidden | None = None) -> list[int]:
    """Cuts giving every stage the same number of blocks; the first ``num_blocks % num_stages`` get one more.

    With ``forbidden`` positions: the split with the smallest largest block count among the allowed cuts.

    Examples:
        >>> uniform_cuts(10, 3)
        [4, 7]
        >>> uniform_cuts(10, 3, forbidden={4: "shared weights", 7: "shared weights"})
        [2, 6]
    """
    if forbidden:
        return balanced_cuts([1.0] * num_blocks, num_stages, forbidden)
    check_num_stages(num_blocks, num_stages)
    size, extra = divmod(num_blocks, num_stages)
    return list(accumulate(size + (stage < extra) for stage in range(num_stages - 1)))


def balanced_cuts(costs: Sequence[float], num_stages: int, forbidden: Forbidden | None = None) -> list[int]:
    """Cuts minimising the largest stage cost (exact dynamic program over contiguous splits).

    Among optimal splits the lexicographically smallest cuts win, so the answer is deterministic. No cut is
    placed at a ``forbidden`` position: the blocks between two allowed positions move as one.

    Examples:
        >>> balanced_cuts([1, 1, 1, 3], 2)
        [3]
        >>> balanced_cuts([1, 1, 1, 1], 3)
        [1, 2]
        >>> balanced_cuts([1, 1, 1, 3], 2, forbidden={3: "parameter 'w' is used by blocks 2 and 3"})
        [2]
    """
    _check_costs(costs)
    num_blocks = len(costs)
    check_num_stages(num_blocks, num_stages)
    bounds = _group_bounds(num_blocks, num_stages, forbidden or {})
    return [bounds[group] for group in _min_max_cuts(stage_costs(costs, bounds[1:-1]), num_stages)]


def _group_bounds(num_blocks: int, num_stages: int, forbidden: Forbidden) -> list[int]:
    """``[0, *allowed cut positions, num_blocks]``; raises when they give fewer than ``num_stages`` stages."""
    allowed = [cut for cut in range(1, num_blocks) if cut not in forbidden]
    if num_stages > len(allowed) + 1:
        blocked = [cut for cut in forbidden if 0 < cut < num_blocks]
        raise PartitionError(
            f"num_stages={num_stages} but the model's {num_blocks} blocks can be cut only at "
            f"{_ranges(allowed) or 'no position'}, so {len(allowed) + 1} stage(s) at most: cuts {_ranges(blocked)} "
            f"would split shared weights ({forbidden[min(blocked)]}); use num_stages<={len(allowed) + 1}, "
            "or stop sharing the weights"
        )
    return [0, *allowed, num_blocks]


def _ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 6, 8, 9]`` -> ``"1..3, 6, 8..9"``."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def _min_max_cuts(costs: Sequence[float], num_stages: int) -> list[int]:
    """The lexicographically smallest cuts among those minimising the largest stage cost."""
    num_blocks = len(costs)
    prefix = [0.0, *accumulate(float(c) for c in costs)]
    best = _suffix_bottlenecks(prefix, num_stages)
    bottleneck = best[num_stages][0]
    cuts, start = [], 0
    for left in range(num_stages - 1, 0, -1):  # stages still to place after this one
        start = next(
            stop
            for stop in range(start + 1, num_blocks - left + 1)
            if prefix[stop] - prefix[start] <= bottleneck and best[left][stop] <= bottleneck
        )
        cuts.append(start)
    return cuts


def _suffix_bottlenecks(prefix: list[float], num_stages: int) -> list[list[float]]:
    """``best[k][i]``: the smallest possible largest stage cost when blocks ``[i, n)`` form ``k`` stages."""
    n = len(prefix) - 1
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][n] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(n - k, -1, -1):
            best[k][i] = min(max(prefix[stop] - prefix[i], best[k - 1][stop]) for stop in range(i + 1, n - k + 2))
    return best


def check_cuts(cuts: Sequence[int], num_blocks: int, num_stages: int, forbidden: Forbidden | None = None) -> list[int]:
    """Validate user cuts and return them as a list; errors name the bad value and the fix.

    Examples:
        >>> check_cuts([3, 7], num_blocks=12, num_stages=3)
        [3, 7]
        >>> check_cuts([2], num_blocks=4, num_stages=2, forbidden={2: "parameter '0.weight' is used by blocks 0 and 2"})
        Traceback (most recent call last):
        ...
        lightning_cmp.errors.PartitionError: cut 2 of partition=[2] puts blocks that share weights in two stages: ...
    """
    check_num_stages(num_blocks, num_stages)
    given = list(cuts)
    if len(given) != num_stages - 1:
        raise PartitionError(
            f"partition={given} gives {len(given) + 1} stages but num_stages={num_stages}; "
            f"give {num_stages - 1} cut indices"
        )
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in given):
        raise PartitionError(f"partition={given} must hold ints (the first block of each stage after the first)")
    if any(a >= b for a, b in pairwise(given)):
        raise PartitionError(
            f"partition={given} must be strictly increasing (cut i is the first block of stage i+1); "
            f"sort it and drop duplicates"
        )
    for cut in given:
        if not 1 <= cut <= num_blocks - 1:
            raise PartitionError(
                f"cut {cut} is out of range: the model has {num_blocks} blocks, so cuts must lie in 1..{num_blocks - 1}"
            )
        if forbidden and cut in forbidden:
            allowed = [c for c in range(1, num_blocks) if c not in forbidden]
            raise PartitionError(
                f"cut {cut} of partition={given} puts blocks that share weights in two stages: {forbidden[cut]}; "
                f"keep them in one stage: cuts may lie at {_ranges(allowed) or 'no position'}"
            )
    return given


def resolve_cuts(
    policy: str | Sequence[int],
    num_blocks: int,
    num_stages: int,
    costs: Sequence[float] | None = None,
    forbidden: Forbidden | None = None,
) -> list[int]:
    """Turn a partition policy (``"uniform"``, ``"balanced"`` or explicit cuts) into checked cuts.

    ``forbidden`` (``Chain.forbidden_cuts()``): positions the policies never cut at and explicit cuts may not use.

    Examples:
        >>> resolve_cuts("uniform", 6, 3)
        [2, 4]
        >>> resolve_cuts("balanced", 3, 2, costs=[4.0, 1.0, 1.0])
        [1]
        >>> resolve_cuts([2], 6, 2)
        [2]
        >>> resolve_cuts("balanced", 3, 2, costs=[4.0, 1.0, 1.0], forbidden={1: "tied weights"})
        [2]
    """
    if not isinstance(policy, str):
        return check_cuts(policy, num_blocks, num_stages, forbidden)
    if policy == "uniform":
        return uniform_cuts(num_blocks, num_stages, forbidden)
    if policy != "balanced":
        raise unknown_name("partition", policy, POLICIES)
    if costs is None:
        raise PartitionError(
            "partition='balanced' needs per-block costs; profile the blocks (profile_blocks) and pass costs, "
            "or use partition='uniform' or explicit cuts"
        )
    if len(costs) != num_blocks:
        raise PartitionError(f"got {len(costs)} block costs but the model has {num_blocks} blocks; give one per block")
    return balanced_cuts(costs, num_stages, forbidden)


def stage_costs(costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """The summed cost of each stage of the split ``cuts``.

    Examples:
        >>> stage_costs([1.0, 2.0, 3.0, 4.0], [2])
        [3.0, 7.0]
    """
    bounds = [0, *cuts, len(costs)]
    return [float(sum(costs[a:b])) for a, b in pairwise(bounds)]


def stage_pass_costs(
    blocks: Sequence[tuple[float, float]], cuts: Sequence[int], scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """Each stage's summed (forward, backward) cost from per-block ``(forward, backward)`` costs, times ``scale``.

    Examples:
        >>> stage_pass_costs([(1.0, 2.0), (1.0, 3.0), (2.0, 4.0)], [2])
        ([2.0, 2.0], [5.0, 4.0])
    """
    forward = stage_costs([f for f, _ in blocks], cuts)
    backward = stage_costs([b for _, b in blocks], cuts)
    return [scale * c for c in forward], [scale * c for c in backward]


def _check_costs(costs: Sequence[float]) -> None:
    for block, cost in enumerate(costs):
        if not (math.isfinite(cost) and cost >= 0):
            raise PartitionError(f"cost {cost!r} of block {block} must be a finite number >= 0; re-profile the model")
