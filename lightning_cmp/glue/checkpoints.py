"""Checkpoints of a split model: one standard file keyed like the unsplit model, gathered or written stage by stage."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_cmp.runtime import OptimizerLayout, Pipeline
from lightning_cmp.runtime.state import find_tensor
from lightning_cmp.runtime.stream import serve, write_streamed

if TYPE_CHECKING:  # an annotation only: this module needs no Lightning
    from lightning_cmp.checkpoint_io import AtomicCheckpointIO

__all__ = ["StreamedCheckpoint", "check_keys", "gathered_optimizer_state", "owned_tensor"]


def check_keys(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Fail like ``load_state_dict(strict=True)`` before anything is loaded (loading itself waits for the split).

    Examples:
        >>> check_keys(nn.Linear(1, 1), {"weight": None})
        Traceback (most recent call last):
        ...
        RuntimeError: Error(s) in loading state_dict for Linear: missing keys ['bias'], unexpected keys []; ...
    """
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: missing keys {missing[:10]}, unexpected "
            f"keys {unexpected[:10]}; the checkpoint was saved from a different model (or load it with strict=False)"
        )


def gathered_optimizer_state(layout: OptimizerLayout, pipeline: Pipeline) -> dict[str, Any]:
    """``layout``'s optimizer state keyed like the unsplit model's, gathered on rank 0 (a collective; ``{}`` on the
    others). Sharded copies lend every parameter's whole state for the time it takes."""
    shards = pipeline.shards
    if shards is None:
        return layout.full_state_dict(pipeline, dst=0) or {}
    shards.unshard_state()
    try:
        return layout.full_state_dict(pipeline, dst=0) or {}
    finally:
        shards.drop_unsharded_state()


def owned_tensor(pipeline: Pipeline, layouts: list[OptimizerLayout], key: Hashable) -> Tensor:
    """What rank 0 asks for while it writes a checkpoint stage by stage: ``("model", name)`` a weight,
    ``(("optim", optimizer), parameter index, state key)`` an optimizer state."""
    assert isinstance(key, tuple)
    if key[0] == "model":
        tensor = find_tensor(pipeline.chain.root, key[1])
        assert tensor is not None
        return tensor
    (_, opt_index), index, state_key = key
    return layouts[opt_index].owned_tensor(pipeline, index, state_key)


class StreamedCheckpoint:
    """A checkpoint written stage by stage (``keep_split=True``): no rank ever holds the whole model.

    Rank 0's checkpoint dict keeps the meta tensors of the stages it does not hold; `mark` and `optimizer_state`
    note which rank holds each one's data, and `save` writes the file as the owners send them, one at a time.
    """

    def __init__(self) -> None:
        #: meta tensors of rank 0's checkpoint dict -> (rank holding the data, key it finds it by)
        self.remote: dict[int, tuple[Tensor, tuple[int, Hashable]]] = {}

    def mark(self, state: Mapping[str, Tensor], pipeline: Pipeline, prefix: str) -> None:
        """Note the owner of every placeholder (meta tensor) of rank 0's module ``state`` (called on rank 0)."""
        for name, owner in pipeline.owners().items():
            tensor = state.get(prefix + name)
            if tensor is not None and tensor.is_meta:
                self.remote[id(tensor)] = (tensor, (owner, ("model", name)))

    def optimizer_state(self, layout: OptimizerLayout, index: int, pipeline: Pipeline) -> dict[str, Any]:
        """Optimizer ``index``'s state with placeholders for the parts other ranks hold."""
        return layout.split_state_dict(pipeline, 0, self.remote, ("optim", index)) or {}

    def save(
        self,
        checkpoint_io: AtomicCheckpointIO,
        checkpoint: dict[str, Any],
        filepath: str | Path,
        storage_options: Any,
        pipeline: Pipeline,
        layouts: list[OptimizerLayout],
    ) -> None:
        """Rank 0 writes the file, asking the owners for each placeholder; the others serve it (a collective)."""
        comm, remote = pipeline.comm, self.remote
        try:
            if comm.me == 0:

                def write(f: Any, name: str) -> None:
                    write_streamed(checkpoint, f, name, lambda t: remote[id(t)][1] if id(t) in remote else None, comm)

                checkpoint_io.save_streamed(filepath, write, storage_options)
            else:
                serve(comm, 0, lambda key: owned_tensor(pipeline, layouts, key))
        finally:
            self.remote = {}
