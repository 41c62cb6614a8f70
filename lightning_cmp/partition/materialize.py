"""Modules built on the meta device: give tensors memory in place, initialise them reproducibly, release them again."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from lightning_cmp.errors import CMPConfigError

__all__ = ["has_meta", "materialize", "release", "tensor_owners"]


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is still on the meta device (no memory yet).

    Examples:
        >>> has_meta(nn.Linear(2, 2)), has_meta(nn.Linear(2, 2, device="meta"))
        (False, True)
    """
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def tensor_owners(module: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """The submodules (qualified names) owning the parameters and buffers ``names`` of ``module``, with their
    attribute names: ``{"layer1.0.conv1": ["weight"], "": ["scale"]}``.

    Examples:
        >>> tensor_owners(nn.Sequential(nn.Linear(2, 2)), ["0.weight", "0.bias"])
        {'0': ['weight', 'bias']}
    """
    owners: dict[str, list[str]] = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        owners.setdefault(owner, []).append(attr)
    return owners


def materialize(
    module: nn.Module, device: torch.device | str, seed: int = 0, names: Iterable[str] | None = None
) -> None:
    """Give the meta tensors of ``module`` (or only its parameters/buffers ``names``) memory on ``device``, in
    place, and initialise them with their owner's ``reset_parameters()``.

    Each owning submodule is reset under a seed derived from ``seed`` and its qualified name, so the values
    do not depend on which process materialises which part, nor in what order: a model materialised stage by
    stage on K workers equals the same model materialised whole in one process. Python objects are kept (an
    optimizer built on the meta parameters keeps working).

    Raises:
        CMPConfigError: a submodule holding meta tensors has no ``reset_parameters()``.

    Examples:
        >>> a, b = nn.Linear(3, 2, device="meta"), nn.Linear(3, 2, device="meta")
        >>> weight = a.weight
        >>> materialize(a, "cpu", seed=7); materialize(b, "cpu", seed=7)
        >>> torch.equal(a.weight, b.weight), weight is a.weight, a.weight.device.type
        (True, True, 'cpu')
    """
    wanted = set(names) if names is not None else None
    for owner_name, owner in _meta_owners(module, wanted):
        reset = getattr(owner, "reset_parameters", None)
        if not callable(reset):
            label = owner_name or "the root module"
            raise CMPConfigError(
                f"{label} ({type(owner).__name__}) was built on the meta device (configure_model or "
                f"init_module(empty_init=True)) but has no reset_parameters(), which lightning_cmp calls to "
                f"initialise each worker's part of the model; define {type(owner).__name__}.reset_parameters(), "
                "or build the model in __init__ instead (then every worker holds the whole model until the "
                "first batch)"
            )
        for _, tensor in _direct(owner):
            if tensor.is_meta:
                _swap(tensor, torch.empty_like(tensor, device=device))
        # Seeds only the generator that draws for ``device`` and restores it: torch.manual_seed would reset
        # every GPU's stream, which then differs between ranks that materialise different stages.
        target = torch.device(device)
        cuda = [target] if target.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"), torch.no_grad():
            torch.default_generator.manual_seed(_seed(seed, owner_name))
            for gpu in cuda:
                with torch.cuda.device(gpu):
                    torch.cuda.manual_seed(_seed(seed, owner_name))
            reset()


def release(tensor: Tensor) -> None:
    """Free ``tensor``'s memory in place: it becomes a meta tensor of the same shape (the Python object stays).

    Examples:
        >>> p = nn.Parameter(torch.ones(3)); release(p); p.is_meta, tuple(p.shape)
        (True, (3,))
    """
    if tensor.is_meta:
        return
    tensor.grad = None
    _swap(tensor, torch.empty_like(tensor, device="meta"))


def _swap(tensor: Tensor, value: Tensor) -> None:
    if isinstance(tensor, nn.Parameter):
        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
    torch.utils.swap_tensors(tensor, value)


def _direct(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if b is not None)


def _meta_owners(module: nn.Module, wanted: set[str] | None) -> Iterator[tuple[str, nn.Module]]:
    for owner_name, owner in module.named_modules(remove_duplicate=True):
        prefix = f"{owner_name}." if owner_name else ""
        if any(t.is_meta and (wanted is None or prefix + attr in wanted) for attr, t in _direct(owner)):
            yield owner_name, owner


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
