"""Partition layer: trace a model into a chain of blocks, profile their cost, and choose the stage cuts."""

from lightning_cmp.partition.bipartition import (
    BlockCosts,
    bipartition_cuts,
    bipartition_loads,
    bipartition_pass_costs,
    check_bipartition_cuts,
    imbalance,
    measured_costs,
)
from lightning_cmp.partition.chain import Chain, trace_chain
from lightning_cmp.partition.profile import profile_blocks
from lightning_cmp.partition.solver import POLICIES as PARTITION_POLICIES
from lightning_cmp.partition.solver import (
    balanced_cuts,
    check_cuts,
    check_num_stages,
    resolve_cuts,
    stage_costs,
    stage_pass_costs,
    too_few_blocks,
    uniform_cuts,
)

__all__ = [
    "PARTITION_POLICIES",
    "BlockCosts",
    "Chain",
    "balanced_cuts",
    "bipartition_cuts",
    "bipartition_loads",
    "bipartition_pass_costs",
    "check_bipartition_cuts",
    "check_cuts",
    "check_num_stages",
    "imbalance",
    "measured_costs",
    "profile_blocks",
    "resolve_cuts",
    "stage_costs",
    "stage_pass_costs",
    "too_few_blocks",
    "trace_chain",
    "uniform_cuts",
]
