"""The user's optimizers as the strategy sees them: unwrapped from Lightning, and asynchronous steps' learning rates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["RateHistory", "learning_rates", "set_learning_rates", "unwrap"]


def unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def learning_rates(optimizer: Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def set_learning_rates(optimizer: Optimizer, rates: list[float]) -> None:
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = lr


class RateHistory:
    """Each step's learning rates since an asynchronous pipeline filled: a mini-batch's update applies the rates of
    the step that fed it (``K - k - 1`` steps before it reaches stage ``k``), as on one device.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        >>> history = RateHistory()
        >>> history.record(opt)
        0
        >>> opt.param_groups[0]["lr"] = 0.1
        >>> history.apply(opt, 0); opt.param_groups[0]["lr"]
        0.5
    """

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def record(self, optimizer: Optimizer) -> int:
        """Remember this step's rates; returns the step's slot."""
        self.steps.append(learning_rates(optimizer))
        return len(self.steps) - 1

    def apply(self, optimizer: Optimizer, slot: int) -> None:
        """Give ``optimizer`` the rates of step ``slot``."""
        set_learning_rates(optimizer, self.steps[slot])

    def drain(self, optimizers: list[Optimizer], drain: Callable[[Callable[[int], None]], None]) -> None:
        """Run ``drain(update)``; ``update(batch)`` steps every optimizer at batch ``batch``'s rates. Forgets the
        history afterwards (the pipeline is empty)."""
        now = [learning_rates(opt) for opt in optimizers]

        def update(batch: int) -> None:
            for opt in optimizers:
                set_learning_rates(opt, self.steps[batch])
                opt.step()
                opt.zero_grad(set_to_none=True)

        try:
            drain(update)
        finally:
            for opt, rates in zip(optimizers, now, strict=True):
                set_learning_rates(opt, rates)
        self.steps = []
