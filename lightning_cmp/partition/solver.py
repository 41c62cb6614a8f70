"""Choose stage cuts over a chain of blocks: uniform, min-max balanced, or checked user cuts (pure Python)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def uniform_cuts(num_blocks: int, num_stages: int) -> list[int]:
    """Cuts giving every stage the same number of blocks; the first ``num_blocks % num_stages`` get one more.

    Examples:
        >>> uniform_cuts(10, 3)
        [4, 7]
    """
    check_num_stages(num_blocks, num_stages)
    size, extra = divmod(num_blocks, num_stages)
    return list(accumulate(size + (stage < extra) for stage in range(num_stages - 1)))


def balanced_cuts(costs: Sequence[float], num_stages: int) -> list[int]:
    """Cuts minimising the largest stage cost (exact dynamic program over contiguous splits).

    Among optimal splits the lexicographically smallest cuts win, so the answer is deterministic.

    Examples:
        >>> balanced_cuts([1, 1, 1, 3], 2)
        [3]
        >>> balanced_cuts([1, 1, 1, 1], 3)
        [1, 2]
    """
    _check_costs(costs)
    num_blocks = len(costs)
    check_num_stages(num_blocks, num_stages)
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


def check_cuts(cuts: Sequence[int], num_blocks: int, num_stages: int) -> list[int]:
    """Validate user cuts and return them as a list; errors name the bad value and the fix.

    Examples:
        >>> check_cuts([3, 7], num_blocks=12, num_stages=3)
        [3, 7]
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
    return given


def resolve_cuts(
    policy: str | Sequence[int], num_blocks: int, num_stages: int, costs: Sequence[float] | None = None
) -> list[int]:
    """Turn a partition policy (``"uniform"``, ``"balanced"`` or explicit cuts) into checked cuts.

    Examples:
        >>> resolve_cuts("uniform", 6, 3)
        [2, 4]
        >>> resolve_cuts("balanced", 3, 2, costs=[4.0, 1.0, 1.0])
        [1]
        >>> resolve_cuts([2], 6, 2)
        [2]
    """
    if not isinstance(policy, str):
        return check_cuts(policy, num_blocks, num_stages)
    if policy == "uniform":
        return uniform_cuts(num_blocks, num_stages)
    if policy != "balanced":
        raise unknown_name("partition", policy, POLICIES)
    if costs is None:
        raise PartitionError(
            "partition='balanced' needs per-block costs; profile the blocks (profile_blocks) and pass costs, "
            "or use partition='uniform' or explicit cuts"
        )
    if len(costs) != num_blocks:
        raise PartitionError(f"got {len(costs)} block costs but the model has {num_blocks} blocks; give one per block")
    return balanced_cuts(costs, num_stages)


def stage_costs(costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """The summed cost of each stage of the split ``cuts``.

    Examples:
        >>> stage_costs([1.0, 2.0, 3.0, 4.0], [2])
        [3.0, 7.0]
    """
    bounds = [0, *cuts, len(costs)]
    return [float(sum(costs[a:b])) for a, b in pairwise(bounds)]


def _check_costs(costs: Sequence[float]) -> None:
    for block, cost in enumerate(costs):
        if not (math.isfinite(cost) and cost >= 0):
            raise PartitionError(f"cost {cost!r} of block {block} must be a finite number >= 0; re-profile the model")
