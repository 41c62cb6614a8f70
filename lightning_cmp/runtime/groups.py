"""Data-parallel pipeline groups: ``world = num_stages x D`` ranks run D pipelines that average their stages.

Rank ``r`` is position ``r % num_stages`` of pipeline ``r // num_stages``: a pipeline's ranks are consecutive,
so a launcher that numbers each node's workers consecutively (Lightning's, torchrun, SLURM) keeps a pipeline,
and with it every mirror pair, on one node whenever the workers per node are a multiple of ``num_stages``.

Each stage's copies across all pipelines form its *averaging group*: for ``cmp`` the ranks at positions ``s`` and
``K - 1 - s`` of every pipeline (2D copies, D for the middle stage of odd K, whose two copies share a rank); for
``mp`` and ``gpipe`` position ``s`` of every pipeline (D copies). Each averaging group is a process group of its
own, so the stages' collectives never wait on each other's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_cmp.runtime.comm import Comm
from lightning_cmp.schedule import Placement

__all__ = ["DataGroups", "GroupLayout"]


@dataclass(frozen=True)
class GroupLayout:
    """Which global rank runs which pipeline position (arithmetic only; no process group needed).

    Examples:
        >>> layout = GroupLayout(num_stages=2, num_groups=2)
        >>> layout.pipeline_ranks(1), layout.data_ranks(0)
        ([2, 3], [0, 2])
        >>> layout.stage_ranks(0, Placement(2, 2)), layout.stage_ranks(1, Placement(2, 1))
        ([0, 1, 2, 3], [1, 3])
        >>> layout.copies_of_stage(1, Placement(3, 2)), layout.copies_of_stage(0, Placement(3, 2))
        (4, 4)
    """

    num_stages: int
    num_groups: int

    def group_of(self, rank: int) -> int:
        return rank // self.num_stages

    def position(self, rank: int) -> int:
        return rank % self.num_stages

    def pipeline_ranks(self, group: int) -> list[int]:
        """The global ranks of pipeline ``group``, by pipeline position."""
        return [group * self.num_stages + p for p in range(self.num_stages)]

    def data_ranks(self, position: int) -> list[int]:
        """The global ranks at pipeline position ``position`` of every pipeline: one per data-parallel group."""
        return [g * self.num_stages + position for g in range(self.num_groups)]

    def stage_ranks(self, stage: int, placement: Placement) -> list[int]:
        """The global ranks holding a copy of ``stage`` in any pipeline (its averaging group), ascending."""
        positions = sorted({placement.rank(r, stage) for r in range(placement.num_replicas)})
        return sorted(g * self.num_stages + p for g in range(self.num_groups) for p in positions)

    def copies_of_stage(self, stage: int, placement: Placement) -> int:
        """How many copies of ``stage`` exist over all pipelines (what an average divides by)."""
        del stage
        return placement.num_replicas * self.num_groups


@dataclass
class DataGroups:
    """This rank's process groups when several pipelines train data-parallel (built collectively by `build`).

    ``pipeline``: the ranks of this rank's pipeline (what a `Pipeline` runs on); ``data``: the ranks at this
    rank's position of every pipeline (Lightning's ``reduce`` and metric syncing average over it: every rank
    of one pipeline already holds the same value); ``stages``: stage -> its averaging group, for the stages
    this rank holds; ``world``: every rank.
    """

    layout: GroupLayout
    group: int
    pipeline: Comm
    data: Comm
    world: Comm
    stages: dict[int, Comm] = field(default_factory=dict)
    copies: dict[int, int] = field(default_factory=dict)  # stage -> copies over all pipelines

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    @classmethod
    def build(cls, world: Comm, num_stages: int, placement: Placement, timeout: timedelta | None = None) -> DataGroups:
        """Create every pipeline, data and averaging group (a collective: every rank creates every group, in the
        same order, as ``torch.distributed.new_group`` requires) and keep the ones this rank belongs to.

        ``timeout``: how long a call in these groups waits for a rank that stopped answering (torch's default for
        a new group is 30 minutes, whatever the default group's is)."""
        if world.size % num_stages:
            raise ValueError(f"{world.size} ranks cannot be split into pipelines of {num_stages} stages")
        layout = GroupLayout(num_stages, world.size // num_stages)
        me = world.ranks[world.me]
        group = layout.group_of(me)

        def comm(ranks: list[int]) -> Comm | None:
            handle = dist.new_group(ranks, timeout=timeout)  # every rank calls it, members or not
            if me not in ranks:
                return None
            sub = Comm(ranks, ranks.index(me), world.device, group=handle)
            sub.processes = world.processes  # every rank's: a call here may fail because a rank elsewhere died
            return sub

        pipelines = [comm(layout.pipeline_ranks(g)) for g in range(layout.num_groups)]
        datas = [comm(layout.data_ranks(p)) for p in range(num_stages)]
        stages: dict[int, Comm] = {}
        for stage in range(num_stages):
            found = comm(layout.stage_ranks(stage, placement))
            if found is not None:
                stages[stage] = found
        pipeline = pipelines[group]
        data = datas[layout.position(me)]
        assert pipeline is not None and data is not None
        copies = {s: layout.copies_of_stage(s, placement) for s in stages}
        return cls(layout, group, pipeline, data, world, stages, copies)

    def broadcast_values(self, copies: dict[tuple[int, int], Any]) -> None:
        """Give every copy of each stage this rank holds the values of its first copy in pipeline 0 (a collective):
        every pipeline then starts from the same weights, however each process initialised its model."""
        by_stage: dict[int, list[Any]] = {}
        for (_, stage), stage_copy in sorted(copies.items()):
            by_stage.setdefault(stage, []).append(stage_copy)
        for stage in sorted(by_stage):
            first, *others = by_stage[stage]
            comm = self.stages[stage]
            tensors = [*first.module.parameters(), *first.module.buffers()]
            with torch.no_grad():
                for tensor in tensors:
                    received = comm.broadcast(tensor.detach() if comm.me == 0 else None, 0)
                    tensor.copy_(received)
                for other in others:
                    for mine, theirs in zip(
                        [*other.module.parameters(), *other.module.buffers()], tensors, strict=True
                    ):
                        mine.copy_(theirs)
