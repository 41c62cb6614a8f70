"""An optimizer built for the whole model, narrowed to this rank's stage copies and widened back for checkpoints."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_cmp.runtime.pipeline import Pipeline

__all__ = ["OptimizerLayout"]


class OptimizerLayout:
    """Remembers the optimizer's whole-model parameter lists so its state can be saved in that layout.

    ``localize`` rewrites ``param_groups`` in place (LR schedulers keep working): a parameter of a stage
    becomes its local copies (none, one, or two when both replicas' copies sit on this rank) and its state
    follows; parameters outside the split module stay as they are. `full_state_dict` gathers the
    state of every copy back, keyed exactly like ``optimizer.state_dict()`` of the unsplit model, so a plain
    single-device run can resume from it. The two replicas' states are averaged: they are equal under
    gradient averaging, and under parameter averaging the mean momentum is what the averaged weights follow.

    Examples:
        >>> layout = OptimizerLayout(optimizer, names={id(p): n for n, p in net.named_parameters()})  # doctest: +SKIP
        >>> layout.localize(pipeline)  # doctest: +SKIP
    """

    def __init__(self, optimizer: Optimizer, names: dict[int, str]) -> None:
        self.optimizer = optimizer
        self.names = names
        self.full_groups: list[list[nn.Parameter]] = [list(g["params"]) for g in optimizer.param_groups]

    def localize(self, pipeline: Pipeline) -> None:
        staged = pipeline.staged_names()
        state = self.optimizer.state
        for group, full in zip(self.optimizer.param_groups, self.full_groups, strict=True):
            local: list[Tensor] = []
            for p in full:
                name = self.names.get(id(p))
                if name is None or name not in staged:
                    local.append(p)
                    continue
                copies = pipeline.copies_of(name)
                saved = state.pop(p, None)
                for index, c in enumerate(copies):
                    if saved is not None:
                        state[c] = saved if index == 0 else copy.deepcopy(saved)
                local.extend(copies)
            group["params"] = local

    def restore(self) -> None:
        """Give the optimizer back its whole-model parameter lists (state of released copies is dropped)."""
        for group, full in zip(self.optimizer.param_groups, self.full_groups, strict=True):
            group["params"] = list(full)
        keep = {id(p) for full in self.full_groups for p in full}
        for p in [p for p in self.optimizer.state if id(p) not in keep]:
            del self.optimizer.state[p]

    def full_state_dict(self, pipeline: Pipeline) -> dict[str, Any]:
        """The optimizer's state dict in the whole-model layout, on every rank (a collective)."""
        staged = pipeline.staged_names()
        state = self.optimizer.state
        mine: dict[int, list[Any]] = {}
        for index, p in enumerate(p for full in self.full_groups for p in full):
            name = self.names.get(id(p))
            if name is None or name not in staged:
                held: list[Tensor] = [p] if pipeline.comm.me == 0 else []  # replicated: rank 0 speaks for it
            else:
                held = pipeline.copies_of(name)  # this rank's copies of it, of either replica
            found = [_to_cpu(state[c]) for c in held if c in state]
            if found:
                mine[index] = found
        copies: dict[int, list[Any]] = {}
        for part in pipeline.comm.all_gather_object(mine):
            for index, found in part.items():
                copies.setdefault(index, []).extend(found)
        merged = {index: _mean_state(found) for index, found in copies.items()}
        groups, start = [], 0
        for group, full in zip(self.optimizer.param_groups, self.full_groups, strict=True):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(start, start + len(full)))})
            start += len(full)
        return {"state": dict(sorted(merged.items())), "param_groups": groups}


def _mean_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One parameter's optimizer state averaged over its copies (float tensors; the rest from the first)."""
    mean = dict(states[0])
    for key, value in mean.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0 and len(states) > 1:
            mean[key] = sum((s[key] for s in states[1:]), value.clone()) / len(states)
    return mean


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
