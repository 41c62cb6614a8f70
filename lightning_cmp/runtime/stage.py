"""One stage copy on one rank: runs its forward and backward and keeps activations per microbatch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_cmp.runtime.replay import Replayer, record
from lightning_cmp.runtime.rng import seeded

if TYPE_CHECKING:
    from lightning_cmp.runtime.weights import StageWeights

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

    With Bi-Partition (`lightning_cmp.runtime.replay`) a copy may also have:

    * ``lead``: ``(replayed, rest)``, two modules sharing ``module``'s weights: its first blocks, whose training
      forward the previous worker ran and recorded (``replayed``, rebuilt here from that recording), and the
      others (``rest``, None when there are none);
    * ``tail``: ``(mirror, original)``: the next stage's first blocks, whose training forward this worker runs
      after its own and records for the next worker. ``mirror`` holds its own copy of their weights (the next
      worker owns and steps them and sends them before every training step); ``original`` gives it the user's
      train/eval flags.

    Under an asynchronous schedule ``weights`` (`lightning_cmp.runtime.weights.StageWeights`) gives each
    training forward the weights its policy asks for. ``before_forward``, when set, runs before every forward
    (sharded averaging waits there for the stage's updated weights).

    Examples:
        >>> copy = StageCopy(replica=0, stage=1, module=nn.Linear(4, 2))
        >>> acts = StageActivations()
        >>> copy.forward(acts, 0, torch.ones(3, 4), training=True).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        replica: int,
        stage: int,
        module: nn.Module,
        twin: nn.Module | None = None,
        lead: tuple[nn.Module, nn.Module | None] | None = None,
        tail: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        self.replica = replica
        self.stage = stage
        self.module = module
        self.twin = twin
        self.lead = lead
        self.tail = tail
        self.weights: StageWeights | None = None
        self.before_forward: Callable[[], None] | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def float_buffers(self) -> list[Tensor]:
        return [b for b in self.module.buffers() if b.is_floating_point()]

    def forward(
        self,
        acts: StageActivations,
        microbatch: int,
        x: Tensor,
        training: bool,
        seed: int | None = None,
        recording: list[Tensor] | None = None,
    ) -> Tensor:
        """Run the stage; with ``training`` keep the graph so `backward` can follow.

        With ``seed`` the stage draws its random numbers (dropout masks) from a generator seeded with it, and
        the caller's random stream is left as it was. The backward draws none: autograd keeps the masks.
        ``recording``: what the previous worker recorded of this copy's ``lead`` blocks (training only).
        """
        if self.before_forward is not None:
            self.before_forward()
        _follow(self.module, self.twin)
        if training and (self.lead is None) != (recording is None):
            raise RuntimeError(
                f"stage {self.stage} of replica {self.replica}: lead blocks and recording must go together"
            )
        with seeded(seed, x.device) if seed is not None else nullcontext():
            return self._run(acts, microbatch, x, training, recording)

    def _run(
        self, acts: StageActivations, microbatch: int, x: Tensor, training: bool, recording: list[Tensor] | None
    ) -> Tensor:
        if not training:
            return self.module(x)
        with torch.enable_grad():
            if self.stage > 0:
                # A fresh leaf to collect the input gradient; cloned so an in-place first op
                # (ReLU(inplace=True)) does not modify a leaf that requires grad.
                leaf = x.detach().requires_grad_()
                acts.inputs[microbatch] = leaf
                x = leaf.clone()
            if self.lead is not None and recording is not None:
                replayed, rest = self.lead
                replayer = Replayer(recording)
                with replayer:
                    x = replayed(x)
                replayer.finish()
                out = rest(x) if rest is not None else x
            elif self.weights is not None:
                leaves = self.weights.for_forward(microbatch)
                out = torch.func.functional_call(self.module, leaves, (x,), strict=False)
            else:
                out = self.module(x)
        acts.outputs[microbatch] = out
        return out

    def run_tail(self, out: Tensor, seed: int | None) -> list[Tensor]:
        """The next stage's lead blocks run on this stage's training output ``out``: their recording.

        ``seed`` must be the one the next stage's forward of this microbatch draws from, so the random ops
        the next worker redoes while replaying give the values drawn here.
        """
        assert self.tail is not None
        mirror, original = self.tail
        _follow(mirror, original)
        with seeded(seed, out.device) if seed is not None else nullcontext():
            _, recording = record(mirror, out)
        return recording

    def backward(self, acts: StageActivations, microbatch: int, grad: Tensor) -> Tensor | None:
        """Back-propagate ``grad`` of the output; returns the input gradient (None for stage 0)."""
        out = acts.outputs.pop(microbatch)
        leaf = acts.inputs.pop(microbatch, None)
        if self.weights is not None:
            self.weights.before_backward(microbatch)
        if out.requires_grad:
            torch.autograd.backward(out, grad.to(out.dtype))
        if self.weights is not None:
            self.weights.after_backward(microbatch)
        if leaf is None:
            return None
        return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _follow(module: nn.Module, twin: nn.Module | None) -> None:
    """Give ``module``'s submodules the train/eval flags of ``twin``'s (a copy of the same structure)."""
    if twin is None:
        return
    for mine, theirs in zip(module.modules(), twin.modules(), strict=True):
        mine.training = theirs.training
