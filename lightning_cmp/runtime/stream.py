"""One ``torch.save`` file written stage by stage: a skeleton first, then each tensor's bytes as its rank sends them.

Used when no process can hold the whole model (``CMPStrategy(keep_split=True)``). Rank ``dst`` writes the
file: ``torch.save`` under ``torch.serialization.skip_data`` lays out every record without its bytes (tensors
are replaced by fake tensors of the same shape), then each record is filled in place, from ``dst``'s memory
or from the rank that holds it, one tensor at a time. The result is an ordinary checkpoint for ``torch.load``
(torch does not check the zip CRCs, which stay those of the empty records).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import IO, Any

import torch
from torch import Tensor

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.runtime.comm import Comm, message_tag

__all__ = ["Source", "serve", "write_streamed"]

_TAG = message_tag(7, 0, 0, 0)

#: Where a tensor's bytes come from: a tensor in ``dst``'s memory, or (rank, key) of a tensor held elsewhere.
Source = Tensor | tuple[int, Hashable]


def write_streamed(
    checkpoint: dict[str, Any], f: IO[bytes], name: str, remote: Callable[[Tensor], tuple[int, Hashable] | None],
    comm: Comm,
) -> None:  # fmt: skip
    """Write ``checkpoint`` to the open file ``f`` (path ``name``) on this rank; every other rank runs `serve`.

    ``remote(t)`` says which rank holds the data of a meta tensor ``t`` of ``checkpoint`` (and under which key
    that rank finds it), or None for a tensor of this rank. A collective with `serve` on the other ranks.
    """
    sources: list[Source] = []
    skeleton = _fake_tree(checkpoint, sources, remote)
    comm.broadcast_object([s for s in sources if isinstance(s, tuple)], comm.me)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, f)
    f.flush()
    reader = torch._C.PyTorchFileReader(name)
    records = sorted(r for r in reader.get_all_records() if r.startswith("data/"))
    if len(records) != len(sources):
        raise CMPConfigError(
            f"the checkpoint holds {len(records)} tensors but lightning_cmp found {len(sources)} in its dicts, "
            "lists and tuples (a tensor inside another object?); save it whole with keep_split=False"
        )
    for index, source in enumerate(sources):
        data = source if isinstance(source, Tensor) else comm.recv(source[0], _TAG)
        f.seek(reader.get_record_offset(f"data/{index}"))  # type: ignore[attr-defined]  # not in torch's stubs
        f.write(_bytes(data))
    f.flush()


def serve(comm: Comm, dst: int, lookup: Callable[[Hashable], Tensor]) -> None:
    """Send ``dst`` the tensors it asks this rank for, in its order, one at a time (the other side of
    `write_streamed`)."""
    requests: list[tuple[int, Hashable]] = comm.broadcast_object(None, dst)
    for rank, key in requests:
        if rank == comm.me:
            comm.send(lookup(key), dst, _TAG)
            comm.wait_sends()


def _fake_tree(value: Any, sources: list[Source], remote: Callable[[Tensor], tuple[int, Hashable] | None]) -> Any:
    """``value`` with every tensor replaced by a fake one (shape and dtype, no data), in ``torch.save`` order."""
    if isinstance(value, Tensor):
        where = remote(value) if value.is_meta else None
        if value.is_meta and where is None:
            raise CMPConfigError(f"a checkpoint tensor of shape {tuple(value.shape)} is held by no rank")
        sources.append(where if where is not None else value.detach())
        return _fake(value)
    if isinstance(value, dict):
        out = type(value)()  # dict subclasses (OrderedDict, Lightning's AttributeDict) keep their type
        for k, v in value.items():
            out[k] = _fake_tree(v, sources, remote)
        return out
    if type(value) in (list, tuple):
        return type(value)(_fake_tree(v, sources, remote) for v in value)
    return value


_MODE: list[Any] = []


def _fake(t: Tensor) -> Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not _MODE:
        _MODE.append(FakeTensorMode())
    with _MODE[0]:
        return torch.empty(tuple(t.shape), dtype=t.dtype)


def _bytes(t: Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
