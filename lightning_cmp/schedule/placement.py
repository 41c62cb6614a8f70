"""Which rank holds which stage of which replica: replica A in order, replica B reversed."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Placement"]


@dataclass(frozen=True)
class Placement:
    """Stage-to-rank map of ``num_replicas`` copies of a ``num_stages``-stage model on ``num_stages`` ranks.

    Replica A (0) puts stage ``s`` on rank ``s``; replica B (1) puts it on rank ``num_stages - 1 - s``, so the
    two copies of a stage sit on mirror ranks and every rank holds one stage of each replica.

    Examples:
        >>> p = Placement(num_stages=4, num_replicas=2)
        >>> [p.rank(1, s) for s in range(4)]
        [3, 2, 1, 0]
        >>> p.stages_on(0)
        [(0, 0), (1, 3)]
    """

    num_stages: int
    num_replicas: int = 1

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages}; it must be at least 1")
        if self.num_replicas not in (1, 2):
            raise ValueError(f"num_replicas={self.num_replicas}; placements hold 1 (mp) or 2 (cmp) replicas")

    @property
    def num_ranks(self) -> int:
        return self.num_stages

    def rank(self, replica: int, stage: int) -> int:
        """The rank holding ``stage`` of ``replica``."""
        if not 0 <= stage < self.num_stages or not 0 <= replica < self.num_replicas:
            raise ValueError(f"no stage {stage} of replica {replica} in {self}")
        return stage if replica == 0 else self.num_stages - 1 - stage

    def stages_on(self, rank: int) -> list[tuple[int, int]]:
        """``(replica, stage)`` pairs held by ``rank``, replica A first."""
        return [(r, s) for r in range(self.num_replicas) for s in range(self.num_stages) if self.rank(r, s) == rank]

    def mirror(self, replica: int, stage: int) -> tuple[int, int] | None:
        """The other replica's copy of ``stage`` as ``(replica, rank)``, or None with a single replica."""
        if self.num_replicas == 1:
            return None
        other = 1 - replica
        return other, self.rank(other, stage)
