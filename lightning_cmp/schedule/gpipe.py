"""GPipe: one replica, its batch split into M microbatches, all forwards (fill) then all backwards (drain).

K=2, M=4 (``render(gpipe(2, 4))``):

```text
slot    0     1     2     3     4     5     6     7     8     9
rank 0: FA0   FA0.1 FA0.2 FA0.3 .     .     BA0.3 BA0.2 BA0.1 BA0
rank 1: .     FA1   FA1.1 FA1.2 FA1.3 BA1.3 BA1.2 BA1.1 BA1   .
```
"""

from __future__ import annotations

from lightning_cmp.schedule.placement import Placement
from lightning_cmp.schedule.timetable import Timetable, build_timetable, resolve_placement

__all__ = ["gpipe"]


def gpipe(num_stages: int, num_microbatches: int = 4, placement: Placement | None = None) -> Timetable:
    """Fill-drain over ``num_microbatches``: every forward of the step, then every backward in reverse.

    With forward cost F and backward cost B per whole batch the step takes (M+K-1)(F+B)/M, against K(F+B)
    for plain ``mp``: the bubble shrinks to (K-1)/(M+K-1).

    Examples:
        >>> table = gpipe(2, 2)
        >>> [a.short for a in table[1] if a]
        ['FA1', 'FA1.1', 'BA1.1', 'BA1']
    """
    return build_timetable(resolve_placement(num_stages, 1, placement), num_microbatches)
