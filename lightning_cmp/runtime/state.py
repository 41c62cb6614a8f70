"""Moving a split model's state between ranks: fill each rank's stages, gather them on one rank, tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cmp.partition.materialize import materialize
from lightning_cmp.runtime.comm import Comm, message_tag

__all__ = ["fill", "find_tensor", "gather_tree"]

_STATE_MSG = 6  # message kind for state transfers (0-4: a step's activations, gradients and averaging)
_TAG = message_tag(_STATE_MSG, 0, 0, 0)  # one tag: transfers are matched in the order both sides agree on


def find_tensor(module: nn.Module, name: str) -> Tensor | None:
    """Parameter or buffer ``name`` of ``module`` (by qualified name), or None when it is not there.

    Examples:
        >>> find_tensor(nn.Sequential(nn.Linear(2, 3)), "0.bias").shape
        torch.Size([3])
        >>> find_tensor(nn.Linear(2, 3), "nothing.here") is None
        True
    """
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        return None
    found = getattr(owner, attr, None)
    return found if isinstance(found, Tensor) else None


def fill(
    root: nn.Module,
    needed: Iterable[str],
    comm: Comm,
    seed: int,
    state: Mapping[str, Tensor] | None = None,
) -> None:
    """Give this rank's tensors ``needed`` (names in ``root``) their values; a collective over ``comm``.

    Each value comes from ``state`` when given (a checkpoint being restored: every rank reads its own
    names only), else from the lowest rank that holds the tensor (a model built in ``__init__``: rank 0, so
    every copy starts from the same values even when each process initialised the model with its own random
    numbers; after ``fit`` rank 0 holds the whole model), else from a seeded ``reset_parameters()`` (a model
    built on the meta device). Only the ranks that need a tensor receive it, one tensor at a time.
    """
    needed = sorted(set(needed))
    if state is not None:
        for name in needed:
            _assign(root, name, state[name], comm.device)
        return
    held = {name for name, t in _named_state(root) if not t.is_meta and t.numel() > 0}
    plans = comm.all_gather_object((sorted(held), needed))
    holders: dict[str, int] = {}
    for rank, (has, _) in enumerate(plans):
        for name in has:
            holders.setdefault(name, rank)
    for rank, (_, wanted) in enumerate(plans):
        wants = [n for n in wanted if holders.get(n) != rank]  # the lowest holder keeps its own value
        from_peers = [n for n in wants if n in holders]
        if rank == comm.me:
            materialize(root, comm.device, seed, [n for n in wants if n not in holders])
            for name in from_peers:
                _assign(root, name, comm.recv(holders[name], _TAG), comm.device)
        else:
            for name in from_peers:
                if holders[name] == comm.me:
                    comm.send(_found(root, name), rank, _TAG)
            comm.wait_sends()


@dataclass(frozen=True)
class _Slot:
    """Where a tensor stood in what a rank sent; its data follows as a message."""

    index: int


def gather_tree(
    mine: Any, comm: Comm, dst: int, consume: Callable[[int, Any], None] | None = None
) -> list[Any] | None:
    """Every rank's ``mine`` (nested dicts, lists and tuples of tensors and plain values) on rank ``dst`` only.

    A collective. Plain values travel pickled; tensors travel as messages straight from the sender's memory,
    one at a time, so no rank but ``dst`` holds more than it had. With ``consume``, ``dst`` hands each
    rank's tree to ``consume(rank, tree)`` as soon as it is complete and keeps none of them (returns None).
    """
    tensors: list[Tensor] = []
    skeleton = _strip(mine, tensors)
    skeletons = comm.all_gather_object(skeleton)
    if comm.me != dst:
        for t in tensors:
            # From where it lives; a tensor on another device (a CPU scalar such as Adam's step, under NCCL)
            # travels as a copy on the group's device, which lives only while it is sent.
            comm.send(t.to(comm.device), dst, _TAG)
            comm.wait_sends()
        return None
    trees: list[Any] = []
    for rank, shape in enumerate(skeletons):
        if rank == comm.me:
            tree = mine
        else:
            tree = _fill_slots(shape, lambda src=rank: comm.recv(src, _TAG).cpu())  # type: ignore[misc]
        if consume is not None:
            consume(rank, tree)
        else:
            trees.append(tree)
    return None if consume is not None else trees


def _strip(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors.append(value.detach())
        return _Slot(len(tensors) - 1)
    if isinstance(value, dict):
        return {k: _strip(v, tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_strip(v, tensors) for v in value)
    return value


def _fill_slots(value: Any, receive: Callable[[], Tensor]) -> Any:
    if isinstance(value, _Slot):
        return receive()
    if isinstance(value, dict):
        return {k: _fill_slots(v, receive) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_fill_slots(v, receive) for v in value)
    return value


def _named_state(root: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from root.named_parameters()
    yield from root.named_buffers()


def _found(root: nn.Module, name: str) -> Tensor:
    tensor = find_tensor(root, name)
    if tensor is None:
        raise KeyError(name)
    return tensor


def _assign(root: nn.Module, name: str, value: Tensor, device: torch.device) -> None:
    """Copy ``value`` into ``root``'s tensor ``name``, giving it memory first if it has none."""
    tensor = _found(root, name)
    if tensor.is_meta or tensor.numel() != value.numel():
        empty = torch.empty(value.shape, dtype=tensor.dtype, device=device)
        if isinstance(tensor, nn.Parameter):
            empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        torch.utils.swap_tensors(tensor, empty)
    with torch.no_grad():
        tensor.copy_(value)
