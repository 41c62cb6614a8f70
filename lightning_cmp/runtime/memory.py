"""What one worker holds: bytes of parameters, buffers, gradients and optimizer state, counted from the tensors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["WorkerBytes", "held_bytes", "tensors_in", "worker_bytes"]


@dataclass(frozen=True)
class WorkerBytes:
    """Bytes a worker holds, by kind; tensors on the meta device and released (empty) tensors count 0.

    Examples:
        >>> net = nn.Linear(4, 2)  # 8 + 2 float32 parameters
        >>> worker_bytes([net], []).parameters
        40
    """

    parameters: int
    buffers: int
    gradients: int
    optimizer: int

    @property
    def state(self) -> int:
        """Parameters + gradients + optimizer state: what the memory target of a split model is about."""
        return self.parameters + self.gradients + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "state": self.state}


def held_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct tensors in ``tensors`` that hold data (a tensor seen twice counts once).

    Examples:
        >>> import torch
        >>> t = torch.zeros(10)
        >>> held_bytes([t, t, torch.empty(3, device="meta"), None])
        40
    """
    seen: set[tuple[int, int, int]] = set()  # (storage address, offset, elements)
    total = 0
    for t in tensors:
        if not isinstance(t, Tensor) or t.is_meta or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), int(t.numel()))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def worker_bytes(modules: Iterable[nn.Module], optimizers: Iterable[Optimizer]) -> WorkerBytes:
    """What ``modules`` (shared tensors once) and ``optimizers`` hold in this process.

    Examples:
        >>> import torch
        >>> net = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> net(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> worker_bytes([net], [opt]).as_dict()
        {'parameters': 40, 'buffers': 0, 'gradients': 40, 'optimizer': 40, 'state': 120}
    """
    modules = list(modules)
    params = [p for m in modules for p in m.parameters()]
    state = [v for opt in optimizers for s in opt.state.values() for v in tensors_in(s)]
    return WorkerBytes(
        parameters=held_bytes(params),
        buffers=held_bytes(b for m in modules for b in m.buffers()),
        gradients=held_bytes(p.grad for p in params),
        optimizer=held_bytes(state),
    )


def tensors_in(value: Any) -> Iterator[Tensor]:
    """Every tensor inside nested dicts, lists and tuples (a checkpoint, an optimizer state).

    Examples:
        >>> import torch
        >>> len(list(tensors_in({"a": [torch.zeros(1), (torch.ones(2), 3)], "b": "x"})))
        2
    """
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from tensors_in(v)
