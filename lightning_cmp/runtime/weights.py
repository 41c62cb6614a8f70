"""Which weights a stage's forward and backward use under an asynchronous schedule (`schedule.asynchronous`).

A stage copy's module keeps the true weights, which only its optimizer changes. Each pass runs the module with
`torch.func.functional_call` on *leaves* made for it, and the gradients those leaves collect are added to the
true parameters' ``.grad`` after the backward:

* ``current``: leaves that share the parameters' storage (``p.data``, which has its own autograd version
  counter). The optimizer's in-place updates between a mini-batch's forward and backward are seen by the
  backward: its input gradient uses the weights current then, its weight gradient the activations of the
  forward (what an asynchronous pipeline without stashing computes). No extra memory.
* ``stash``: a copy of the weights made at the forward and kept until that mini-batch's backward (PipeDream's
  weight stashing): one copy per mini-batch in flight on the stage.
* ``predict``: one scratch copy per stage (none where both distances are 0: the last stage at K = 2). Before a
  forward it is filled with the weights predicted ``s`` updates ahead, ``W - s * d``, and before a backward with
  the prediction for the backward's distance;
  the graph of every mini-batch in flight refers to that scratch, so each backward sees the values just put
  there (SpecTrain). ``d`` is the optimizer's own update direction: ``lr * momentum_buffer`` for SGD with
  momentum (the paper's ``eta * v``), ``lr * m_hat / (sqrt(v_hat) + eps)`` for Adam and AdamW (plus
  ``lr * weight_decay * W`` for AdamW), as XPipe predicts for Adam. Before a parameter's first update there is no
  direction yet and the prediction is the weights themselves. The true weights are never overwritten, so there
  is nothing to restore before an optimizer step.

Weights computed from the parameters inside the forward (a product, a normalisation) keep their forward-time
values in the graph; the rule above applies to what autograd saved of the parameters themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.schedule import WEIGHT_POLICIES, Version, prediction_steps, weight_versions

__all__ = ["StageWeights", "check_predictable", "update_direction"]

#: d(p) = scale * tensor, such that the next update is about ``p - d(p)``; None: no direction known yet.
Direction = Callable[[nn.Parameter], tuple[Tensor, float] | None]


def check_predictable(optimizer: Optimizer) -> None:
    """Refuse an optimizer whose update direction SpecTrain cannot predict, naming the fix.

    Examples:
        >>> check_predictable(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9))
        >>> check_predictable(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
        Traceback (most recent call last):
        ...
        lightning_cmp.errors.CMPConfigError: strategy='spectrain' predicts each stage's weights from ...
    """
    name = type(optimizer).__name__
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if any(g.get("amsgrad") for g in optimizer.param_groups):
            raise CMPConfigError(
                f"strategy='spectrain' predicts weights from Adam's moments; {name}(amsgrad=True) is not supported: "
                "use amsgrad=False or strategy='pipedream'"
            )
        return
    if type(optimizer) is torch.optim.SGD:
        zero = [i for i, g in enumerate(optimizer.param_groups) if not g.get("momentum")]
        if not zero:
            return
        detail = f"SGD has momentum=0 in parameter group(s) {zero}"
    else:
        detail = f"{name} is neither SGD with momentum nor Adam/AdamW"
    raise CMPConfigError(
        f"strategy='spectrain' predicts each stage's weights from the optimizer's momentum (W - s * lr * v), but "
        f"{detail}. Use torch.optim.SGD(..., momentum=0.9) (or Adam/AdamW), or strategy='pipedream' (weight "
        "stashing: no prediction needed)"
    )


def update_direction(optimizer: Optimizer) -> Direction:
    """``d(p)`` as ``(tensor, scale)`` for SGD with momentum (``momentum_buffer``, ``lr``) and Adam/AdamW (its
    bias-corrected step, ``lr``); see the module docstring. Call `check_predictable` first."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    decoupled = isinstance(optimizer, torch.optim.AdamW)

    def direction(p: nn.Parameter) -> tuple[Tensor, float] | None:
        group, state = groups.get(id(p)), optimizer.state.get(p)
        if group is None or not state:
            return None
        lr = float(group["lr"])
        if not adam:
            buffer = state.get("momentum_buffer")
            return None if buffer is None else (buffer, lr)
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        m_hat = state["exp_avg"] / (1 - beta1**step)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        out = m_hat.div_(denom)
        if decoupled and group["weight_decay"]:
            out.add_(p.detach(), alpha=group["weight_decay"])
        return out, lr

    return direction


class StageWeights:
    """The leaves one stage copy's passes run on, per mini-batch in flight, under ``policy``.

    Examples:
        >>> net = nn.Linear(2, 1)
        >>> weights = StageWeights(net, "stash", num_stages=2, stage=0)
        >>> leaves = weights.for_forward(0)
        >>> torch.equal(leaves["weight"], net.weight), leaves["weight"] is net.weight
        (True, False)
    """

    def __init__(self, module: nn.Module, policy: str, num_stages: int, stage: int) -> None:
        if policy not in WEIGHT_POLICIES:
            raise CMPConfigError(f"weight policy {policy!r}; valid: {', '.join(map(repr, WEIGHT_POLICIES))}")
        self.policy = policy
        self.num_stages, self.stage = num_stages, stage
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.direction: Direction | None = None  # set with the optimizer (``predict``)
        self._live: dict[int, dict[str, Tensor]] = {}  # mini-batch -> the leaves its graph holds
        self._scratch: dict[str, Tensor] | None = None
        # SpecTrain's last stage at K = 2 predicts 0 updates ahead in both passes: the weights themselves, no scratch
        self._predicts_nothing = policy == "predict" and prediction_steps(num_stages, stage) == (0, 0)
        #: the most bytes of weight copies held at once so far (`stashed_bytes` right after each forward)
        self.peak_bytes = 0
        #: (mini-batch, pass) -> the version it used, counted in updates since the pipeline filled (tests, traces)
        self.versions: dict[tuple[int, str], Version] = {}

    def stashed_bytes(self) -> int:
        """Bytes of weight copies held right now (stashes, or the prediction scratch)."""
        held = list(self._live.values()) if self.policy == "stash" else [self._scratch or {}]
        return sum(t.numel() * t.element_size() for leaves in held for t in leaves.values())

    def for_forward(self, batch: int) -> dict[str, Tensor]:
        """The leaves mini-batch ``batch``'s forward runs on (and its backward keeps)."""
        self.versions[(batch, "forward")] = weight_versions(self.num_stages, self.stage, batch, self.policy)[0]
        if self.policy == "current" or self._predicts_nothing:
            leaves = {n: p.data.requires_grad_() for n, p in self.params.items()}
        elif self.policy == "stash":
            leaves = {n: p.detach().clone().requires_grad_() for n, p in self.params.items()}
        else:
            leaves = self._predicted(prediction_steps(self.num_stages, self.stage)[0])
        self._live[batch] = leaves
        self.peak_bytes = max(self.peak_bytes, self.stashed_bytes())
        return leaves

    def before_backward(self, batch: int) -> None:
        """Put the backward's weights where mini-batch ``batch``'s graph finds them (``predict`` only)."""
        self.versions[(batch, "backward")] = weight_versions(self.num_stages, self.stage, batch, self.policy)[1]
        if self.policy == "predict" and not self._predicts_nothing:
            self._predicted(prediction_steps(self.num_stages, self.stage)[1])

    def after_backward(self, batch: int) -> None:
        """Add the gradients mini-batch ``batch``'s leaves collected to the true parameters' ``.grad``."""
        leaves = self._live.pop(batch)
        for name, leaf in leaves.items():
            grad = leaf.grad
            if grad is None:
                continue
            leaf.grad = None  # the gradient tensor moves to the parameter: no leaf refers to it any more
            p = self.params[name]
            p.grad = grad if p.grad is None else p.grad.add_(grad)

    def _predicted(self, ahead: int) -> dict[str, Tensor]:
        """The scratch leaves, filled with the weights predicted ``ahead`` updates on (without autograd noticing:
        the graphs in flight refer to them and must see the new values)."""
        if self._scratch is None:
            self._scratch = {n: p.detach().clone().requires_grad_() for n, p in self.params.items()}
        assert self.direction is not None, "StageWeights(policy='predict') needs the optimizer's direction"
        with torch.no_grad():
            for name, p in self.params.items():
                scratch = self._scratch[name].data
                scratch.copy_(p)
                found = self.direction(p) if ahead else None
                if found is not None:
                    tensor, scale = found
                    scratch.add_(tensor, alpha=-ahead * scale)
        return self._scratch
