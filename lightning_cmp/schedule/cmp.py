"""Cross model parallelism: replica A on ranks 0..K-1 and replica B reversed, run at the same time.

Each replica carries half the global batch. With even K the two never want the same rank in the same
slot; with odd K they collide on the middle rank, where replica A goes first and B waits a slot.
K=4, one microbatch per replica (``render(cmp(4))``):

```text
slot    0   1   2   3   4   5   6   7
rank 0: FA0 .   .   FB3 BB3 .   .   BA0
rank 1: .   FA1 FB2 .   .   BB2 BA1 .
rank 2: .   FB1 FA2 .   .   BA2 BB1 .
rank 3: FB0 .   .   FA3 BA3 .   .   BB0
```
"""

from __future__ import annotations

from lightning_cmp.schedule.interleave import build_interleaved
from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.timetable import StageCosts, Timetable, build_timetable, resolve_placement

__all__ = ["cmp"]


def cmp(
    num_stages: int,
    num_microbatches: int = 1,
    placement: Placement | None = None,
    backward_cost: float = 2.0,
    stage_costs: StageCosts | None = None,
) -> Timetable:
    """A's half-batch flows 0→K-1→0 while B's flows K-1→0→K-1; both use every rank.

    With ``num_microbatches`` > 1 each replica's half is split into microbatches and both directions are
    interleaved 1F1B-style (Chimera-class, `build_interleaved`): each microbatch's loss is computed as soon as
    its last forward ran, and stage ``s`` of a replica holds about ``K - s`` microbatches. The order is built
    for ``stage_costs`` (measured per-stage forward and backward costs) when given, else for a backward costing
    ``backward_cost`` times its forward.

    Examples:
        >>> table = cmp(2)
        >>> [[a.short for a in table[r] if a] for r in (0, 1)]
        [['FA0', 'FB1', 'BB1', 'BA0'], ['FB0', 'FA1', 'BA1', 'BB0']]
    """
    placement = resolve_placement(num_stages, 2, placement)
    if num_microbatches > 1:
        return build_interleaved(placement, num_microbatches, backward_cost, stage_costs)
    return build_timetable(placement, num_microbatches)
