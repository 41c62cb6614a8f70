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
    follows; parameters outside the split module stay as they are. :meth:`full_state_dict` gathers the
    state back from the ranks holding replica A's copies, keyed exactly like ``optimizer.state_dict()`` of
    the unsplit model, so a plain single-device run can resume from it.

    Example:
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

    def _owner(self, pipeline: Pipeline, p: nn.Parameter, owned: set[str]) -> bool:
        name = self.names.get(id(p))
        if name is None or name not in pipeline.staged_names():
            return pipeline.comm.me == 0  # replicated: rank 0 speaks for it
        return name in owned

    def full_state_dict(self, pipeline: Pipeline) -> dict[str, Any]:
        """The optimizer's state dict in the whole-model layout, on every rank (a collective)."""
        owned = set(pipeline.owned_names())
        flat = [p for full in self.full_groups for p in full]
        mine = {
            index: _to_cpu(self.optimizer.state[p])
            for index, p in enumerate(flat)
            if p in self.optimizer.state and self._owner(pipeline, p, owned)
        }
        merged: dict[int, Any] = {}
        for part in pipeline.comm.all_gather_object(mine):
            merged.update(part)
        groups, start = [], 0
        for group, full in zip(self.optimizer.param_groups, self.full_groups, strict=True):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(start, start + len(full)))})
            start += len(full)
        return {"state": dict(sorted(merged.items())), "param_groups": groups}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
