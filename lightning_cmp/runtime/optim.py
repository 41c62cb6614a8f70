"""An optimizer built for the whole model, narrowed to this rank's stage copies and widened back for checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.runtime.pipeline import Pipeline
from lightning_cmp.runtime.state import find_tensor, gather_tree

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

    def full_state_dict(self, pipeline: Pipeline, dst: int = 0) -> dict[str, Any] | None:
        """The optimizer's state dict in the whole-model layout on rank ``dst``, None elsewhere (a collective).

        Every rank sends the state of its copies one tensor at a time; only ``dst`` holds the whole state.
        """
        staged = pipeline.staged_names()
        mine: dict[int, list[Any]] = {}
        for index, p in enumerate(self._flat_params()):
            name = self.names.get(id(p))
            if name is None or name not in staged:
                held: list[Tensor] = [p] if pipeline.comm.me == dst else []  # replicated: dst speaks for it
            else:
                held = pipeline.copies_of(name)  # this rank's copies of it, of either replica
            found = [self.optimizer.state[c] for c in held if c in self.optimizer.state]
            if found:
                mine[index] = found
        copies: dict[int, list[Any]] = {}

        def collect(rank: int, part: dict[int, list[Any]]) -> None:
            for index, found in part.items():
                copies.setdefault(index, []).extend(_to_cpu(s) for s in found)

        gather_tree(mine, pipeline.comm, dst, collect)
        if pipeline.comm.me != dst:
            return None
        merged = {index: _mean_state(found) for index, found in copies.items()}
        if pipeline.data is not None and pipeline.averaging == "parameter":
            # each pipeline's copies followed their own batches: the mean over the pipelines is what the averaged
            # weights follow (a collective of the pipelines' ``dst`` ranks)
            for _, entry in sorted(merged.items()):
                for key, value in sorted(entry.items()):
                    if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
                        total = pipeline.data.data.all_reduce_sum(value.to(pipeline.comm.device, copy=True))
                        entry[key] = (total / pipeline.data.num_groups).to(value.device)
        return {"state": dict(sorted(merged.items())), "param_groups": self._groups()}

    def split_state_dict(
        self, pipeline: Pipeline, dst: int, remote: dict[int, tuple[Tensor, tuple[int, Hashable]]], tag: Hashable
    ) -> dict[str, Any] | None:
        """`full_state_dict` without moving a tensor: on ``dst``, the state of parameters held elsewhere are meta
        tensors, each registered in ``remote`` as (its owner's rank, ``(tag, index, key)``); None elsewhere.

        A collective (only the shapes travel). `owned_tensor` finds such a tensor on its owner.
        """
        owners = pipeline.owners()
        me = pipeline.comm.me
        shapes: dict[int, dict[str, Any]] = {}
        for index, p in enumerate(self._flat_params()):
            owner = owners.get(self.names.get(id(p), ""), dst)
            if owner == me and me != dst and (held := self._held(pipeline, index)) in self.optimizer.state:
                shapes[index] = {k: _shape_of(v) for k, v in self.optimizer.state[held].items()}
        everyone = pipeline.comm.all_gather_object(shapes)
        if me != dst:
            return None
        state: dict[int, Any] = {}
        for index, p in enumerate(self._flat_params()):
            owner = owners.get(self.names.get(id(p), ""), dst)
            if owner == dst:
                held = self._held(pipeline, index)
                if held in self.optimizer.state:
                    state[index] = dict(self.optimizer.state[held])
            elif index in everyone[owner]:
                state[index] = {}
                for key, shape in everyone[owner][index].items():
                    value = _placeholder(shape)
                    if isinstance(value, Tensor):
                        remote[id(value)] = (value, (owner, (tag, index, key)))
                    state[index][key] = value
        return {"state": state, "param_groups": self._groups()}

    def owned_tensor(self, pipeline: Pipeline, index: int, key: str) -> Tensor:
        """The optimizer state ``key`` of whole-model parameter ``index``, on the rank that owns it."""
        value = self.optimizer.state[self._held(pipeline, index)][key]
        assert isinstance(value, Tensor)
        return value

    def _held(self, pipeline: Pipeline, index: int) -> Tensor:
        """This rank's tensor for whole-model parameter ``index``: the traced module's own copy, or the parameter."""
        p = self._flat_params()[index]
        name = self.names.get(id(p))
        found = find_tensor(pipeline.chain.root, name) if name is not None else None
        return found if found is not None else p

    def _groups(self) -> list[dict[str, Any]]:
        groups, start = [], 0
        for group, full in zip(self.optimizer.param_groups, self.full_groups, strict=True):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({**hyper, "params": list(range(start, start + len(full)))})
            start += len(full)
        return groups

    def load_full_state_dict(self, state_dict: dict[str, Any], pipeline: Pipeline) -> None:
        """Load a whole-model optimizer state dict into this rank's copies only (after `localize`).

        Hyperparameters (``lr``, ``initial_lr``, ...) are restored group by group as ``Optimizer.load_state_dict``
        does; per-parameter state is cast to the copy's device, and floating state to its dtype (``step`` kept).
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.full_groups) or any(
            len(g["params"]) != len(full) for g, full in zip(groups, self.full_groups, strict=True)
        ):
            sizes = [len(g["params"]) for g in groups]
            raise CMPConfigError(
                f"the checkpoint's optimizer has parameter groups of sizes {sizes} but this model's optimizer has "
                f"{[len(f) for f in self.full_groups]}: resume with the same configure_optimizers"
            )
        for group, saved in zip(self.optimizer.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        staged = pipeline.staged_names()
        local = pipeline.local_names()
        saved_state = state_dict["state"]
        for index, p in enumerate(self._flat_params()):
            if index not in saved_state:
                continue
            name = self.names.get(id(p))
            if name is None or name not in staged:
                targets: list[Tensor] = [p]
            else:
                targets = pipeline.copies_of(name) if name in local else []
            for target in targets:
                self.optimizer.state[target] = _cast_state(saved_state[index], target)

    def _flat_params(self) -> list[nn.Parameter]:
        return [p for full in self.full_groups for p in full]


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


def _shape_of(value: Any) -> Any:
    """A tensor's (shape, dtype) marker, other values as they are: what a placeholder is built from."""
    return ("tensor", tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value


def _placeholder(shape: Any) -> Any:
    if isinstance(shape, tuple) and len(shape) == 3 and shape[0] == "tensor":
        return torch.empty(shape[1], dtype=shape[2], device="meta")
    return shape


def _cast_state(value: Any, param: Tensor, key: str | None = None) -> Any:
    """A fresh copy of a saved optimizer state on ``param``'s device, floating tensors in its dtype; ``step``
    stays where it was saved, as ``Optimizer.load_state_dict`` leaves it (the saved tensors may be mapped from
    the checkpoint file, hence the copies)."""
    if isinstance(value, Tensor):
        if key == "step":
            return value.clone()
        dtype = param.dtype if value.is_floating_point() else value.dtype
        return value.to(device=param.device, dtype=dtype, copy=True)
    if isinstance(value, dict):
        return {k: _cast_state(v, param, k) for k, v in value.items()}
    return value
