"""One stage copy on one rank: runs its forward and backward and keeps activations per microbatch."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_cmp.runtime.rng import seeded

__all__ = ["StageActivations", "StageCopy"]


@dataclass
class StageActivations:
    """What one forward left for its backward: the (leaf) input and the output, per microbatch."""

    inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)


class StageCopy:
    """Stage ``stage`` of replica ``replica``: a module holding one contiguous range of the model's blocks.

    ``twin`` is the module whose train/eval flags this copy follows (a deep copy made when both replicas'
    copies of a stage live on one rank must mirror what the user sets on the original, e.g. BatchNorm in eval).

    Examples:
        >>> copy = StageCopy(replica=0, stage=1, module=nn.Linear(4, 2))
        >>> acts = StageActivations()
        >>> copy.forward(acts, 0, torch.ones(3, 4), training=True).shape
        torch.Size([3, 2])
    """

    def __init__(self, replica: int, stage: int, module: nn.Module, twin: nn.Module | None = None) -> None:
        self.replica = replica
        self.stage = stage
        self.module = module
        self.twin = twin

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def float_buffers(self) -> list[Tensor]:
        return [b for b in self.module.buffers() if b.is_floating_point()]

    def forward(
        self, acts: StageActivations, microbatch: int, x: Tensor, training: bool, seed: int | None = None
    ) -> Tensor:
        """Run the stage; with ``training`` keep the graph so `backward` can follow.

        With ``seed`` the stage draws its random numbers (dropout masks) from a generator seeded with it, and
        the caller's random stream is left as it was. The backward draws none: autograd keeps the masks.
        """
        self._follow_twin()
        with seeded(seed, x.device) if seed is not None else nullcontext():
            return self._run(acts, microbatch, x, training)

    def _run(self, acts: StageActivations, microbatch: int, x: Tensor, training: bool) -> Tensor:
        if not training:
            return self.module(x)
        with torch.enable_grad():
            if self.stage > 0:
                # A fresh leaf to collect the input gradient; cloned so an in-place first op
                # (ReLU(inplace=True)) does not modify a leaf that requires grad.
                leaf = x.detach().requires_grad_()
                acts.inputs[microbatch] = leaf
                x = leaf.clone()
            out = self.module(x)
        acts.outputs[microbatch] = out
        return out

    def backward(self, acts: StageActivations, microbatch: int, grad: Tensor) -> Tensor | None:
        """Back-propagate ``grad`` of the output; returns the input gradient (None for stage 0)."""
        out = acts.outputs.pop(microbatch)
        leaf = acts.inputs.pop(microbatch, None)
        if out.requires_grad:
            torch.autograd.backward(out, grad.to(out.dtype))
        if leaf is None:
            return None
        return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)

    def _follow_twin(self) -> None:
        if self.twin is None:
            return
        for mine, theirs in zip(self.module.modules(), self.twin.modules(), strict=True):
            mine.training = theirs.training
