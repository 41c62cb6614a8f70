"""Loss scaling (fp16 mixed precision) when no worker holds every gradient: every scaler decides alike.

`torch.amp.GradScaler` skips a step when a gradient it unscaled is inf or NaN, and halves its scale. Under a
pipeline each worker's optimizer holds only its stages, so an overflow in one stage would skip the step on the
workers holding that stage and not on the others: the copies drift apart and the scales disagree. After each
``unscale_`` the workers therefore agree (one all-reduce of one number): an overflow anywhere counts everywhere,
so every worker skips or steps, and updates its scale, exactly as one device would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_cmp.runtime.comm import Comm

__all__ = ["agree_on_overflow"]


def agree_on_overflow(scaler: torch.amp.GradScaler, comm: Comm) -> Callable[[], None]:
    """Make ``scaler.unscale_`` agree over ``comm``'s ranks on whether any gradient overflowed; returns the undo.

    Examples:
        >>> undo = agree_on_overflow(trainer.precision_plugin.scaler, comm)  # doctest: +SKIP
        >>> undo()  # doctest: +SKIP
    """
    unscale = scaler.unscale_

    def agreeing_unscale(optimizer: Optimizer) -> None:
        unscale(optimizer)
        state: dict[str, Any] = scaler._per_optimizer_states[id(optimizer)]
        found: dict[torch.device, torch.Tensor] = state["found_inf_per_device"]
        scale = scaler._scale
        assert scale is not None  # unscale_ has run, so the scale exists
        local = sum(float(v.item()) for v in found.values())
        anywhere = comm.all_reduce(torch.tensor([local], dtype=torch.float32, device=comm.device), dist.ReduceOp.SUM)
        agreed = torch.full((), float(anywhere.item() > 0), dtype=torch.float32, device=scale.device)
        # A worker whose stages hold no gradient at all recorded no device: it still takes the verdict.
        state["found_inf_per_device"] = {device: agreed.to(device) for device in found} or {scale.device: agreed}

    scaler.__dict__["unscale_"] = agreeing_unscale

    def undo() -> None:
        scaler.__dict__.pop("unscale_", None)

    return undo
