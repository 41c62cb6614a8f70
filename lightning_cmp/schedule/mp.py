"""Plain model parallelism: one replica, stage s on rank s, one rank busy at a time.

K=4, one microbatch (``render(mp(4))``):

```text
slot    0   1   2   3   4   5   6   7
rank 0: FA0 .   .   .   .   .   .   BA0
rank 1: .   FA1 .   .   .   .   BA1 .
rank 2: .   .   FA2 .   .   BA2 .   .
rank 3: .   .   .   FA3 BA3 .   .   .
```
"""

from __future__ import annotations

from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.timetable import Timetable, build_timetable, resolve_placement

__all__ = ["mp"]


def mp(num_stages: int, num_microbatches: int = 1, placement: Placement | None = None) -> Timetable:
    """Replica A's batch goes forward 0→K-1 then backward K-1→0 (fill-drain over microbatches).

    Examples:
        >>> table = mp(3)
        >>> [a.short for a in table[1] if a]
        ['FA1', 'BA1']
        >>> len(table[0])
        6
    """
    return build_timetable(resolve_placement(num_stages, 1, placement), num_microbatches)
