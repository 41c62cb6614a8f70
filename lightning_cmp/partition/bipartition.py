"""Bi-Partition: separate forward and backward cuts that balance each worker's load (pure Python).

Layer-wise cuts give worker ``s`` both passes of the same blocks. Bi-Partition (Cui et al. 2023) cuts the
forward and the backward pass at different positions, so a worker's load ``f + b`` can be evened out across
blocks of very different cost. Cuts follow ``solver.py``: ``forward_cuts[s]`` is the first block whose
forward runs on worker ``s + 1``, ``backward_cuts[s]`` the first whose backward does::

    block          0    1    2    3    4    5    6    7
    forward      | w0           | w1      | w2           |   forward_cuts  = [3, 5]
    backward     | w0      | w1           | w2           |   backward_cuts = [2, 5]
                             ^ block 2 is split: forward on w0, backward on w1 (w1 owns its weights)

**Constraint** (ours): every block's two passes run on the same worker or on neighbouring ones. Equivalently
the cut pairs do not interleave, ``max(F[s], B[s]) <= min(F[s+1], B[s+1])``, and each worker's forward and
backward ranges overlap or touch (both lists are also valid layer-wise cuts: every worker runs at least one
forward and one backward block). Why: the extra traffic of a split block (its activation, its weights) then
flows only between neighbours, which a pipeline already connects; a worker's blocks stay one contiguous run
of the chain; the pipeline's order is unchanged (forward 0 → K-1, backward K-1 → 0); and the exact solver
below stays linearithmic per probe.

**Solver**: binary search on the bottleneck ``T``. Sorted by position, the cuts alternate between *zones*
``[min(F[s], B[s]), max(F[s], B[s]))`` of split blocks shared by workers ``s`` and ``s + 1``, and runs of
blocks with both passes on one worker. For a fixed ``T``, a dynamic program over zones keeps, per zone end
and kind, the smallest load the next worker inherits (smaller always dominates); a monotonic stack finds
each zone's best start in ``O(log n)``. One probe is ``O(K n log n)``; ~35 probes reach the optimum.
Then each zone the optimum does not need becomes a layer-wise cut again: no traffic for nothing.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from lightning_cmp.errors import PartitionError
from lightning_cmp.partition.solver import Forbidden, _group_bounds, check_cuts, check_num_stages

__all__ = [
    "BlockCosts",
    "bipartition_cuts",
    "bipartition_loads",
    "bipartition_pass_costs",
    "check_bipartition_cuts",
    "imbalance",
    "measured_costs",
]


@dataclass(frozen=True)
class BlockCosts:
    """Per-block costs of one training step, all in seconds (any one unit works if used throughout).

    Block ``l``'s forward (``forward[l]``) is charged to the worker running its forward, its backward
    (``backward[l]``) to the worker running its backward. A *split* block, whose passes run on two workers,
    also charges its **backward** worker, which owns its weights and steps them:
    ``min(move[l], recompute[l])`` to get what the backward needs (``move``: receive the block's input
    activation from the forward worker; ``recompute``: rerun the forward, default ``forward[l]``) plus
    ``weight_sync[l]`` to send the updated weights to the forward worker before its next forward. Both
    transfers are charged to the backward worker only (the forward worker's side is assumed to overlap its
    compute). If recomputing also needs the input moved there, pass ``recompute = forward + move``.

    Examples:
        >>> costs = BlockCosts(forward=[1, 1, 1], backward=[2, 2, 2], move=[0.5] * 3, weight_sync=[0.25] * 3)
        >>> costs.num_blocks, costs.extra(1)
        (3, 0.75)
    """

    forward: Sequence[float]
    backward: Sequence[float]
    move: Sequence[float]
    weight_sync: Sequence[float]
    recompute: Sequence[float] | None = None

    def __post_init__(self) -> None:
        fields = self._fields()
        lengths = {name: len(values) for name, values in fields.items()}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{n} {name}" for name, n in lengths.items())
            raise PartitionError(
                f"BlockCosts got {listed} values; give one value per block in each list ({len(self.forward)} blocks)"
            )
        for name, values in fields.items():
            for block, cost in enumerate(values):
                if isinstance(cost, bool) or not (isinstance(cost, numbers.Real) and math.isfinite(cost) and cost >= 0):
                    raise PartitionError(
                        f"{name} cost {cost!r} of block {block} must be a finite number >= 0 (seconds); "
                        "re-profile the model"
                    )
        for name, values in fields.items():  # frozen and hashable: tuples of floats
            object.__setattr__(self, name, tuple(float(v) for v in values))

    @property
    def num_blocks(self) -> int:
        return len(self.forward)

    def extra(self, block: int) -> float:
        """The split-block charge to the backward worker: ``min(move, recompute) + weight_sync``."""
        recompute = self.forward if self.recompute is None else self.recompute
        return float(min(self.move[block], recompute[block]) + self.weight_sync[block])

    def _fields(self) -> dict[str, Sequence[float]]:
        fields = {"forward": self.forward, "backward": self.backward, "move": self.move}
        if self.recompute is not None:
            fields["recompute"] = self.recompute
        return {**fields, "weight_sync": self.weight_sync}


def measured_costs(
    passes: Sequence[tuple[float, float]], replays: Sequence[tuple[float, int, int]], seconds_per_byte: float
) -> BlockCosts:
    """`BlockCosts` of what the runtime does, from measurements: ``passes`` per block (forward, backward)
    seconds (``profile_blocks``), ``replays`` per block (replay seconds, recorded bytes, weight bytes)
    (``runtime.replay.profile_replay``) and the measured ``seconds_per_byte`` of a message between workers.

    A split block costs its backward worker the replay of its forward plus receiving the recording, and
    sending its updated weights back (``move`` and ``weight_sync``). The runtime always replays, so
    ``recompute`` is the same as ``move``.

    Examples:
        >>> costs = measured_costs([(1.0, 2.0)], [(0.1, 1000, 200)], seconds_per_byte=1e-3)
        >>> costs.move, costs.weight_sync
        ((1.1,), (0.2,))
    """
    if len(passes) != len(replays):
        raise PartitionError(
            f"{len(passes)} blocks of forward/backward times but {len(replays)} replay measurements; profile the same "
            "chain with both"
        )
    move = [seconds + recorded * seconds_per_byte for seconds, recorded, _ in replays]
    return BlockCosts(
        forward=[f for f, _ in passes],
        backward=[b for _, b in passes],
        move=move,
        weight_sync=[weights * seconds_per_byte for _, _, weights in replays],
        recompute=move,
    )


def bipartition_loads(costs: BlockCosts, forward_cuts: Sequence[int], backward_cuts: Sequence[int]) -> list[float]:
    """Each worker's load: its forward and backward blocks, plus the charges of the split blocks it owns.

    Any two valid layer-wise cut lists of one length are accepted (see ``check_bipartition_cuts`` for the
    solver's neighbour constraint). With equal lists the loads are the layer-wise ``stage_costs`` of
    ``forward + backward``.

    Examples:
        >>> costs = BlockCosts(forward=[1, 1, 1], backward=[2, 2, 2], move=[1] * 3, weight_sync=[0] * 3)
        >>> bipartition_loads(costs, [1], [1]), bipartition_loads(costs, [2], [1])
        ([3.0, 6.0], [4.0, 6.0])
    """
    n, num_stages = costs.num_blocks, len(forward_cuts) + 1
    forward, backward = _check_pair(forward_cuts, backward_cuts, n, num_stages, None)
    loads = [0.0] * num_stages
    for block, (f, b) in enumerate(zip(costs.forward, costs.backward, strict=True)):
        fw, bw = bisect_right(forward, block), bisect_right(backward, block)
        if fw == bw:
            loads[fw] += f + b  # summed as stage_costs sums: equal cuts give its numbers bit for bit
        else:
            loads[fw] += f
            loads[bw] += b + costs.extra(block)
    return loads


def bipartition_pass_costs(
    costs: BlockCosts, forward_cuts: Sequence[int], backward_cuts: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Each worker's (forward, backward) time under a Bi-Partition: the forwards of its forward range plus the
    charges of the split blocks whose backward it runs (counted as forward time: the runtime replays a split
    block during the forward), and the backwards of its backward range. Their sums are `bipartition_loads`.

    Examples:
        >>> costs = BlockCosts(forward=[1, 1, 1], backward=[2, 2, 2], move=[0.5] * 3, weight_sync=[0.0] * 3)
        >>> bipartition_pass_costs(costs, [2], [1])
        ([2.0, 1.5], [2.0, 4.0])
    """
    n, num_stages = costs.num_blocks, len(forward_cuts) + 1
    forward_at, backward_at = _check_pair(forward_cuts, backward_cuts, n, num_stages, None)
    forward, backward = [0.0] * num_stages, [0.0] * num_stages
    for block, (f, b) in enumerate(zip(costs.forward, costs.backward, strict=True)):
        fw, bw = bisect_right(forward_at, block), bisect_right(backward_at, block)
        forward[fw] += f
        backward[bw] += b
        if fw != bw:
            forward[bw] += costs.extra(block)
    return forward, backward


def imbalance(loads: Sequence[float]) -> float:
    """The slowest worker's load over the mean load (1.0 is perfect balance; all-zero loads count as 1.0).

    Examples:
        >>> imbalance([3.0, 6.0])
        1.3333333333333333
    """
    if not loads:
        raise PartitionError("imbalance() needs at least one load; pass one value per worker")
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def check_bipartition_cuts(
    forward_cuts: Sequence[int],
    backward_cuts: Sequence[int],
    num_blocks: int,
    num_stages: int,
    forbidden: Forbidden | None = None,
    forward_ahead: bool = False,
) -> tuple[list[int], list[int]]:
    """Validate a bipartition: two valid layer-wise cut lists whose pairs do not interleave.

    ``forward_ahead``: also require ``forward_cuts[i] >= backward_cuts[i]`` (a split block's forward runs on
    the earlier worker: what the runtime serves, see `bipartition_cuts`).

    Examples:
        >>> check_bipartition_cuts([3, 5], [2, 5], num_blocks=8, num_stages=3)
        ([3, 5], [2, 5])
        >>> check_bipartition_cuts([2, 4], [5, 6], num_blocks=8, num_stages=3)
        Traceback (most recent call last):
        ...
        lightning_cmp.errors.PartitionError: cuts 1 and 2 interleave: forward_cuts=[2, 4], backward_cuts=[5, 6] ...
    """
    forward, backward = _check_pair(forward_cuts, backward_cuts, num_blocks, num_stages, forbidden)
    for stage in range(num_stages - 2):
        if max(forward[stage], backward[stage]) > min(forward[stage + 1], backward[stage + 1]):
            raise PartitionError(
                f"cuts {stage + 1} and {stage + 2} interleave: forward_cuts={forward}, backward_cuts={backward} "
                f"send a block's two passes to workers two or more apart; keep "
                f"max(forward_cuts[i], backward_cuts[i]) <= min(forward_cuts[i+1], backward_cuts[i+1])"
            )
    behind = [i for i, (f, b) in enumerate(zip(forward, backward, strict=True)) if f < b]
    if forward_ahead and behind:
        i = behind[0]
        raise PartitionError(
            f"forward_cuts[{i}]={forward[i]} < backward_cuts[{i}]={backward[i]}: "
            f"blocks {forward[i]}..{backward[i] - 1} would run their forward on worker {i + 1} and their backward "
            f"on worker {i}, which the runtime does not serve (a split block's forward runs on the earlier "
            "worker); give forward_cuts[i] >= backward_cuts[i]"
        )
    return forward, backward


def _check_pair(
    forward_cuts: Sequence[int], backward_cuts: Sequence[int], n: int, num_stages: int, forbidden: Forbidden | None
) -> tuple[list[int], list[int]]:
    if len(forward_cuts) != len(backward_cuts):
        raise PartitionError(
            f"forward_cuts={list(forward_cuts)} and backward_cuts={list(backward_cuts)} give different numbers of "
            f"stages; give num_stages - 1 cuts in each"
        )
    return check_cuts(forward_cuts, n, num_stages, forbidden), check_cuts(backward_cuts, n, num_stages, forbidden)


def bipartition_cuts(
    costs: BlockCosts, num_stages: int, forbidden: Forbidden | None = None, forward_ahead: bool = False
) -> tuple[list[int], list[int]]:
    """``(forward_cuts, backward_cuts)`` minimising the slowest worker's ``bipartition_loads`` (exact).

    ``forward_ahead``: only zones whose forward runs on the earlier worker (``forward_cuts[i] >=
    backward_cuts[i]``), the optimum over that family. This is what the runtime serves: the forward worker
    sends what the backward worker needs along with the activation it sends anyway, so the schedule keeps its
    shape (`lightning_cmp.runtime.replay`); the other direction would make a worker wait for a later one
    during the forward.

    Both lists avoid ``forbidden`` positions (``Chain.forbidden_cuts()``: blocks sharing weights) and obey the
    neighbour constraint of this module. The optimum is never above the best layer-wise cuts' (equal lists
    are one of the choices). Exact: the search ends only when no bottleneck one float below the answer fits
    (loads summed by prefix differences, so last-bit rounding may differ from ``bipartition_loads``).

    Examples:
        >>> costs = BlockCosts(forward=[1, 1, 1], backward=[2, 2, 2], move=[0] * 3, weight_sync=[0] * 3)
        >>> cuts = bipartition_cuts(costs, 2)
        >>> cuts, bipartition_loads(costs, *cuts)
        (([1], [2]), [5.0, 4.0])
    """
    n = costs.num_blocks
    check_num_stages(n, num_stages)
    if num_stages == 1:
        return [], []
    chain = _Chain(costs, _group_bounds(n, num_stages, forbidden or {})[1:-1], forward_ahead)
    best = chain.probe(chain.both[n], num_stages)  # every layer-wise split fits under the whole step
    assert best is not None
    top = best_load = max(bipartition_loads(costs, *best))
    low = chain.both[n] / num_stages * (1 - 1e-12)  # below the mean layer-wise load: nothing fits
    while True:
        # Bisect to a relative 1e-9, then ask whether anything fits one float below the best bottleneck.
        middle = (low + top) / 2 if top - low > 1e-9 * top else math.nextafter(top, -math.inf)
        if middle <= low:
            return _unsplit(costs, chain, best, best_load)
        found = chain.probe(middle, num_stages)
        if found is None:
            low = middle
            continue
        load = max(bipartition_loads(costs, *found))
        if load < best_load:
            best, best_load = found, load
        top = min(load, middle)


def _unsplit(
    costs: BlockCosts, chain: _Chain, cuts: tuple[list[int], list[int]], bound: float
) -> tuple[list[int], list[int]]:
    """Turn each zone of split blocks that the bottleneck does not need back into a layer-wise cut (the one
    least loading its two workers), until none is left: the same optimum with less traffic."""
    forward, backward = list(cuts[0]), list(cuts[1])
    while any(_unsplit_zone(chain, forward, backward, k, bound) for k in range(len(forward))):
        pass
    if max(bipartition_loads(costs, forward, backward)) <= bound:  # never trade the optimum for last-bit rounding
        return forward, backward
    return cuts


def _unsplit_zone(chain: _Chain, forward: list[int], backward: list[int], k: int, bound: float) -> bool:
    """Make cut pair ``k`` one layer-wise cut in place if both its workers stay ``<= bound``; say whether it did."""
    fw, bw = forward[k], backward[k]
    if fw == bw:
        return False
    first = max(forward[k - 1], backward[k - 1]) + 1 if k else 1  # both lists stay strictly increasing
    stop = min(forward[k + 1], backward[k + 1]) if k + 1 < len(forward) else chain.n
    options = []
    for cut in range(max(min(fw, bw), first), min(max(fw, bw) + 1, stop)):
        forward[k] = backward[k] = cut
        worst = max(chain.load(forward, backward, k), chain.load(forward, backward, k + 1))
        if cut in chain.allowed_set and worst <= bound:
            options.append((worst, cut))
    forward[k], backward[k] = (min(options)[1],) * 2 if options else (fw, bw)
    return bool(options)


# How a zone [lo, hi) of split blocks ends (the kind of cut at ``hi``):
_BOTH, _HI_F, _HI_B = 0, 1, 2  # F == B (a layer-wise cut, empty zone), F > B, B > F

#: Per zone kind, the load lists from the feasibility probe: states[kind][hi], the load the next worker inherits.
_States = list[list[float]]


class _Chain:
    """Prefix sums of one cost model and the feasibility probe over them."""

    def __init__(self, costs: BlockCosts, allowed: list[int], forward_ahead: bool = False) -> None:
        self.n = costs.num_blocks
        self.forward_ahead = forward_ahead  # no zone of kind _HI_B
        self.allowed = allowed  # the positions a cut may take, increasing
        self.allowed_set = set(allowed)
        self.both = [0.0, *accumulate(f + b for f, b in zip(costs.forward, costs.backward, strict=True))]
        self.fwd = [0.0, *accumulate(costs.forward)]
        self.owned = [0.0, *accumulate(b + costs.extra(i) for i, b in enumerate(costs.backward))]
        self.extra = [0.0, *accumulate(costs.extra(i) for i in range(self.n))]

    def load(self, forward: list[int], backward: list[int], stage: int) -> float:
        """Worker ``stage``'s load under the cuts: both ranges, less the charges of blocks it runs twice."""
        fw_start, fw_stop = ([0, *forward, self.n])[stage : stage + 2]
        bw_start, bw_stop = ([0, *backward, self.n])[stage : stage + 2]
        both = max(0.0, self.extra[min(fw_stop, bw_stop)] - self.extra[max(fw_start, bw_start)])
        return self.fwd[fw_stop] - self.fwd[fw_start] + self.owned[bw_stop] - self.owned[bw_start] - both

    def probe(self, limit: float, num_stages: int) -> tuple[list[int], list[int]] | None:
        """Cuts whose every worker load is ``<= limit``, or None when there are none."""
        states: _States = [[math.inf] * (self.n + 1) for _ in range(3)]
        states[_BOTH][0] = 0.0  # before worker 0
        trail = []
        for _ in range(num_stages - 1):
            start = self._entry(states)
            # A zone may also start right where the previous one ended on the other list (F after B, or B
            # after F): both lists stay strictly increasing.
            touching = {kind: [min(a, b) for a, b in zip(start, states[kind], strict=True)] for kind in (_HI_F, _HI_B)}
            new: _States = [[math.inf] * (self.n + 1) for _ in range(3)]
            for hi in self.allowed:  # an empty zone: a layer-wise cut
                if start[hi] <= limit:
                    new[_BOTH][hi] = 0.0
            # F < B: the zone's forward runs on the later worker, its backward (and charges) on the earlier one;
            # B < F: the other way round.
            los_b = [-1] * (self.n + 1)
            if not self.forward_ahead:
                los_b = self._sweep(touching[_HI_B], self.owned, self.fwd, limit, new[_HI_B])
            los_f = self._sweep(touching[_HI_F], self.fwd, self.owned, limit, new[_HI_F])
            trail.append((states, los_f, los_b))
            states = new
        if not self._entry(states)[self.n] <= limit:
            return None
        return self._cuts(trail, self._source(states, self.n, _BOTH))

    def _entry(self, states: _States) -> list[float]:
        """``start[l]``: the least load of a worker whose own blocks (both passes) begin after a zone, up to ``l``."""
        both = self.both
        ends = [min(a, b, c) - p for a, b, c, p in zip(*states, both, strict=True)]
        best = [math.inf, *accumulate(ends, min)][:-1]  # over zone ends strictly before l
        return [b + p for b, p in zip(best, both, strict=True)]

    def _sweep(
        self, entry: list[float], earlier: list[float], later: list[float], limit: float, out: list[float]
    ) -> list[int]:
        """Per zone end ``hi``, the largest start ``lo`` (least load handed on) keeping the earlier worker's load
        ``<= limit``: a monotonic stack of ``entry[lo] - earlier[lo]``, increasing, searched by bisection."""
        keys: list[float] = []
        stack: list[int] = []
        los = [-1] * (self.n + 1)
        inf = math.inf
        for pos in self.allowed:
            if keys:
                found = bisect_right(keys, limit - earlier[pos]) - 1
                if found >= 0:
                    los[pos] = lo = stack[found]
                    out[pos] = later[pos] - later[lo]
            key = entry[pos] - earlier[pos]
            if key < inf:
                while keys and keys[-1] >= key:
                    del keys[-1], stack[-1]
                keys.append(key)
                stack.append(pos)
        return los

    def _source(self, states: _States, lo: int, kind: int) -> tuple[int, int]:
        """Where the worker starting at ``lo`` came from: the zone end ``(hi, kind)`` it follows."""
        if kind != _BOTH and states[kind][lo] <= self._entry(states)[lo]:
            return lo, kind  # it starts right where the previous zone ended
        values = [(states[k][h] - self.both[h], h, k) for h in range(lo) for k in (_BOTH, _HI_F, _HI_B)]
        _, hi, prev = min(values)
        return hi, prev

    def _cuts(
        self, trail: list[tuple[_States, list[int], list[int]]], last: tuple[int, int]
    ) -> tuple[list[int], list[int]]:
        forward: list[int] = []
        backward: list[int] = []
        hi, kind = last
        for states, los_f, los_b in reversed(trail):
            lo = {_BOTH: hi, _HI_F: los_f[hi], _HI_B: los_b[hi]}[kind]
            forward.append(lo if kind == _HI_B else hi)
            backward.append(lo if kind == _HI_F else hi)
            hi, kind = self._source(states, lo, kind)
        return forward[::-1], backward[::-1]
