"""Lightning's collectives (``reduce``) under a pipeline strategy: combined over the pipelines, not the workers."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.runtime.groups import DataGroups

__all__ = ["reduce_over_pipelines"]


def reduce_over_pipelines(
    groups: DataGroups, tensor: Tensor, reduce_op: object, schedule: str, device: torch.device
) -> Tensor:
    """``tensor`` summed or averaged over the D workers at this pipeline position (a collective).

    Every worker of a pipeline computed the same value on the same batch: only the pipelines differ. An integer
    tensor keeps its dtype for ``"sum"``; a mean is a float.
    """
    op = str(reduce_op).lower().rsplit(".", 1)[-1]
    if op not in ("mean", "avg", "sum"):
        raise CMPConfigError(
            f"reduce_op={reduce_op!r}: strategy={schedule!r} reduces over its data-parallel pipelines with 'mean' or "
            "'sum'"
        )
    out = tensor.detach().clone().to(device)
    dtype = out.dtype
    out = groups.data.all_reduce_sum(out if out.is_floating_point() else out.double())
    if op in ("mean", "avg"):
        out = out / groups.num_groups
    return out.to(dtype) if not dtype.is_floating_point and op == "sum" else out
