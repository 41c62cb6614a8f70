"""The user's LightningModule as the strategy sees it: the split submodule, the tensors outside it, device moves."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.partition.materialize import materialize
from lightning_cmp.runtime import Comm, Pipeline
from lightning_cmp.runtime.groups import DataGroups

__all__ = [
    "average_rest_gradients",
    "base_seed",
    "broadcast_rest",
    "explain_reads",
    "materialize_rest",
    "rest",
    "restore_metric_sync",
    "submodule",
    "sync_metrics_over_pipelines",
    "to_device",
]


def submodule(module: nn.Module, name: str) -> nn.Module:
    """``module``'s submodule ``name`` (the ``module=`` option), or an error listing the children there are."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        children = ", ".join(repr(n) for n, _ in module.named_children()) or "none"
        raise CMPConfigError(
            f"module={name!r}: {type(module).__name__} has no submodule {name!r}; its children are {children}"
        ) from None


def to_device(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)`` for the tensors that hold data; meta tensors (stages held elsewhere) stay meta."""
    module._apply(lambda t: t if t.is_meta else t.to(device))


def base_seed() -> int:
    """The seed ``seed_everything`` set (Lightning's ``PL_GLOBAL_SEED``), 0 without one: it seeds initialisation."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    except ValueError:
        return 0


def rest(module: nn.Module, split: nn.Module, prefix: str) -> list[tuple[str, Tensor]]:
    """``module``'s parameters and buffers outside ``split`` (its submodule at ``prefix``): every worker holds them.

    Examples:
        >>> net = nn.Module(); net.body = nn.Linear(2, 2); net.head = nn.Linear(2, 1)
        >>> [name for name, _ in rest(net, net.body, "body.")]
        ['head.weight', 'head.bias']
    """
    inside = {prefix + n for n, _ in [*split.named_parameters(), *split.named_buffers()]}
    return [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if n not in inside]


def materialize_rest(
    module: nn.Module,
    split: nn.Module,
    prefix: str,
    device: torch.device,
    seed: int,
    state: Mapping[str, Tensor] | None,
) -> None:
    """The tensors outside the split module: values from the restored checkpoint ``state``, or memory and a seeded
    initialisation when they were built on the meta device."""
    names = [name for name, _ in rest(module, split, prefix)]
    materialize(module, device, seed, names)
    if state is not None:
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if name in names and name in state:
                    tensor.copy_(state[name])


def broadcast_rest(module: nn.Module, split: nn.Module, prefix: str, world: Comm) -> None:
    """Every pipeline starts from rank 0's values of the tensors outside the split module (a collective)."""
    with torch.no_grad():
        for _, tensor in rest(module, split, prefix):
            tensor.copy_(world.broadcast(tensor.detach() if world.me == 0 else None, 0))


def average_rest_gradients(module: nn.Module, split: nn.Module, prefix: str, groups: DataGroups) -> None:
    """Gradients of parameters outside the split module, averaged over the pipelines (a collective; the same on
    every worker of one pipeline already)."""
    for _, tensor in rest(module, split, prefix):
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
            groups.data.all_reduce_sum(grad).div_(groups.num_groups)
            tensor.grad = grad


@contextmanager
def explain_reads(current: Callable[[], Pipeline | None], hook: str, schedule: str, rank: int) -> Iterator[None]:
    """A step that used a parameter this worker does not hold (a meta tensor here) fails deep inside torch; say why
    and what to do instead. ``current()``: the pipeline when the step failed (the first step builds it)."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        pipeline = current()
        if pipeline is None or "meta" not in str(err):
            raise
        stages = sorted({stage for _, stage in pipeline.placement.stages_on(pipeline.comm.me)})
        raise CMPConfigError(
            f"{hook} used a parameter or buffer this worker does not hold ({type(err).__name__}: {err}). Under "
            f"strategy={schedule!r} each worker holds only its stages (rank {rank} holds stages {stages} of "
            f"{pipeline.placement.num_stages}); the others are meta tensors here, so code in {hook} cannot read them "
            "(a hand-written L2 penalty, a logged weight or gradient norm). Put an L2 penalty in the optimizer (e.g. "
            "SGD(..., weight_decay=...)), compute such terms inside the model's forward, or use fewer stages (at "
            "num_stages=2 every worker holds a copy of every stage)"
        ) from err


#: a metric's own ``sync_on_compute`` and ``process_group``, to restore after the run
MetricSync = dict[nn.Module, tuple[bool, Any]]


def sync_metrics_over_pipelines(module: nn.Module, groups: DataGroups | None) -> MetricSync:
    """Every worker of a pipeline holds identical torchmetrics states: syncing them across its workers would count
    them K times. One pipeline: no sync; several: over the D workers at this pipeline position. Returns what
    `restore_metric_sync` puts back."""
    saved: MetricSync = {}
    for metric in module.modules():
        if hasattr(metric, "sync_on_compute") and hasattr(metric, "dist_sync_on_step"):
            saved[metric] = (metric.__dict__["sync_on_compute"], metric.__dict__.get("process_group"))
            if groups is None:
                metric.__dict__["sync_on_compute"] = False
            else:
                metric.__dict__["process_group"] = groups.data.group
    return saved


def restore_metric_sync(saved: MetricSync) -> None:
    for metric, (sync, group) in saved.items():
        metric.__dict__["sync_on_compute"] = sync
        metric.__dict__["process_group"] = group
