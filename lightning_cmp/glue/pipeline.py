"""The pipeline built on the first batch: the split planned and logged, the runtime built, the optimizers narrowed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_cmp.partition import Chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.asynchronous import AsyncPipeline
from lightning_cmp.runtime.groups import DataGroups
from lightning_cmp.runtime.plan import Partition, plan_partition
from lightning_cmp.schedule import get_schedule

__all__ = ["build_pipeline", "localize_optimizers"]

log = logging.getLogger(__name__)


def build_pipeline(
    chain: Chain,
    x: Tensor,
    world: Comm,
    groups: DataGroups | None,
    partition: Partition,
    schedule: str,
    num_microbatches: int,
    averaging: str,
    seed: int,
    state: Mapping[str, Tensor] | None,
) -> Pipeline:
    """This rank's pipeline for ``chain``, split as ``partition`` says for the batch ``x`` (a collective).

    The same cuts and per-stage costs (what an interleaved schedule orders its microbatches for) on every rank:
    planned in each pipeline, pipeline 0's plan taken by all. ``state``: a restored checkpoint's entries for the
    split module. Rank 0 logs the split (``lightning_cmp`` logger, INFO, shown by default).
    """
    comm = groups.pipeline if groups is not None else world
    plan = plan_partition(partition if comm.size > 1 else "uniform", chain, x, comm, schedule, num_microbatches)
    if groups is not None:
        plan = world.broadcast_object(plan, 0)
    where = f"at blocks {plan.cuts}"
    if plan.forward_cuts != plan.cuts:
        where = f"forward at blocks {plan.forward_cuts}, backward at {plan.cuts}"
    note = f" ({plan.note})" if plan.note else ""
    pipelines = f" x {groups.num_groups} data-parallel pipelines" if groups is not None else ""
    if world.me == 0:  # once per pipeline built, not once per worker
        log.info("lightning_cmp: %s split into %d stages%s %s%s", chain.name, comm.size, pipelines, where, note)
    if get_schedule(schedule).asynchronous:
        return AsyncPipeline(chain, plan.cuts, schedule, comm, seed, state)
    return Pipeline(
        chain,
        plan.cuts,
        schedule,
        comm,
        averaging,
        num_microbatches,
        seed=seed,
        state=state,
        stage_costs=plan.stage_costs,
        forward_cuts=plan.forward_cuts,
        data=groups,
    )


def localize_optimizers(
    pipeline: Pipeline, chain: Chain, optimizers: list[Optimizer], saved: list[dict[str, Any]] | None, sharded: bool
) -> list[OptimizerLayout]:
    """The optimizers narrowed to this rank's stages, with a restored checkpoint's ``saved`` states; an
    asynchronous pipeline steps them itself, and ``sharded`` copies each step their shard (after the state is
    restored: the shards take their slices of it)."""
    names = {id(p): n for n, p in chain.root.named_parameters()}
    layouts = [OptimizerLayout(opt, names) for opt in optimizers]
    for layout in layouts:
        layout.localize(pipeline)
    for layout, state in zip(layouts, saved or [], strict=False):
        layout.load_full_state_dict(state, pipeline)
    for layout in layouts:
        if isinstance(pipeline, AsyncPipeline):
            pipeline.attach_optimizer(layout.optimizer)
        if sharded:
            pipeline.shard(layout.optimizer)
    return layouts
