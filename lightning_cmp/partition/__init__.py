"""Partition layer: trace a model into a chain of blocks, profile their cost, and choose the stage cuts.

The solvers (`solver`, `bipartition`) are pure Python; the names that need torch (`Chain`, `trace_chain`,
`profile_blocks`) are imported on first use, so importing the solver does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_cmp.partition.bipartition import (
    BlockCosts,
    bipartition_cuts,
    bipartition_loads,
    bipartition_pass_costs,
    check_bipartition_cuts,
    imbalance,
    measured_costs,
)
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

if TYPE_CHECKING:
    from lightning_cmp.partition.chain import Chain, trace_chain
    from lightning_cmp.partition.profile import profile_blocks

_NEED_TORCH = {"Chain": "chain", "trace_chain": "chain", "profile_blocks": "profile"}


def __getattr__(name: str) -> Any:
    if name in _NEED_TORCH:
        import importlib

        return getattr(importlib.import_module(f"lightning_cmp.partition.{_NEED_TORCH[name]}"), name)
    raise AttributeError(f"module 'lightning_cmp.partition' has no attribute {name!r}")


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
