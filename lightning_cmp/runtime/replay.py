"""Record a forward on one rank, rebuild its autograd graph on another without redoing the heavy compute.

Bi-Partition (``partition="bipartition"``) runs the forward of a few blocks on one worker and their backward
on the next. PyTorch's backward needs the autograd graph, and a graph cannot be sent. Recomputing the forward
on the backward worker would cost it exactly what it saves (its load is then the same as with a layer-wise
cut), so instead:

* the **forward worker** runs the blocks under `Recorder`, a ``TorchDispatchMode`` that keeps a copy of the
  output of every *heavy* op (convolutions and matrix products: `HEAVY`) and sends that list along with the
  activation;
* the **backward worker** runs the same blocks on the same input under `Replayer`, which returns the recorded
  outputs for the heavy ops, in order, and executes every other op (elementwise ops, BatchNorm, pooling, views,
  random ops) itself. Autograd sits above the dispatch mode, so it records the graph exactly as if the heavy
  ops had run there: the backward is the one of the forward that the forward worker computed.

The other ops see identical inputs on both workers (the recorded outputs, the same weights, the same seeded
random generator), so they produce identical values; BatchNorm's running statistics advance alike on both.
Cheap ops are redone because moving their outputs would cost more than computing them.

Examples:
    >>> block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> x = torch.randn(2, 3, 8, 8, requires_grad=True)
    >>> with Recorder() as rec:
    ...     y = block(x)
    >>> len(rec.outputs)
    1
    >>> with Replayer(rec.outputs):
    ...     z = block(x)
    >>> torch.equal(y, z)
    True
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.partition.chain import Chain
from lightning_cmp.partition.profile import now, restored, runnable

__all__ = ["HEAVY", "Recorder", "Replayer", "profile_replay", "record"]

_aten = torch.ops.aten
#: Ops whose outputs are recorded and replayed: the compute-bound ones. Everything else is redone.
HEAVY = frozenset(
    {
        _aten.convolution,
        _aten.mm,
        _aten.addmm,
        _aten.bmm,
        _aten.baddbmm,
        _aten._scaled_dot_product_flash_attention_for_cpu,
        _aten._scaled_dot_product_efficient_attention,
        _aten._scaled_dot_product_flash_attention,
        _aten._scaled_dot_product_cudnn_attention,
    }
)


def _is_heavy(func: Any) -> bool:
    return func.overloadpacket in HEAVY


class Recorder(TorchDispatchMode):
    """Runs everything; keeps a detached copy of each heavy op's output(s) in ``outputs``, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if _is_heavy(func):
            # a copy: a later in-place op (ReLU(inplace=True)) must not change what was recorded
            for tensor in out if isinstance(out, tuple | list) else (out,):
                if isinstance(tensor, Tensor):
                    self.outputs.append(tensor.detach().clone())
        return out


class Replayer(TorchDispatchMode):
    """Returns ``outputs`` (a `Recorder`'s) for the heavy ops in order; runs every other op.

    Each replayed output is checked against the shape and dtype the op would give (worked out on the meta
    device), and `finish` checks that every recorded output was used: a block that runs differently on the
    two workers fails loudly instead of training on mismatched values.
    """

    def __init__(self, outputs: Sequence[Tensor]) -> None:
        super().__init__()
        self.outputs = list(outputs)
        self.used = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not _is_heavy(func):
            return func(*args, **kwargs)
        expected = func(*tree_map_only(Tensor, _meta, args), **tree_map_only(Tensor, _meta, kwargs))
        many = isinstance(expected, tuple | list)
        replayed = []
        for want in expected if many else (expected,):
            if not isinstance(want, Tensor):
                replayed.append(want)
                continue
            if self.used >= len(self.outputs):
                raise self._mismatch(func, f"it recorded only {len(self.outputs)} outputs")
            got = self.outputs[self.used]
            self.used += 1
            if got.shape != want.shape or got.dtype != want.dtype:
                raise self._mismatch(
                    func,
                    f"output {self.used - 1} is {tuple(got.shape)} {got.dtype}, here {tuple(want.shape)} {want.dtype}",
                )
            replayed.append(got)
        return type(expected)(replayed) if many else replayed[0]

    def finish(self) -> None:
        if self.used != len(self.outputs):
            raise self._mismatch(None, f"{len(self.outputs) - self.used} recorded outputs were left over")

    @staticmethod
    def _mismatch(func: Any, detail: str) -> CMPConfigError:
        where = f" at {func}" if func is not None else ""
        return CMPConfigError(
            f"a block split between two workers (partition='bipartition') ran differently on them{where}: {detail}. "
            "Its forward must run the same operations on the same input on every worker (no branch on the rank or "
            "on values); use partition='balanced' for this model"
        )


def _meta(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def profile_replay(chain: Chain, example_input: Tensor, repeats: int = 3) -> list[tuple[float, int, int]]:
    """Per block, ``(replay seconds, recorded bytes, weight bytes)`` on ``example_input`` (a training forward).

    *Replay seconds*: the median time to rebuild the block's graph under `Replayer` from a local recording
    (the ops it redoes plus dispatch overhead; moving the recording is not included). *Recorded bytes*: what the
    forward worker sends. *Weight bytes*: the block's parameters and floating-point buffers, sent to the forward
    worker's mirror at the start of every training step. Buffers, gradients and the random stream are left as they were.

    Examples:
        >>> from lightning_cmp.partition import trace_chain
        >>> chain = trace_chain(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> [(n, w) for _, n, w in profile_replay(chain, torch.randn(4, 8))]
        [(128, 288), (0, 0), (32, 72)]
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    results = []
    with torch.inference_mode(False), torch.enable_grad(), restored(chain.root, example_input.device):
        x = example_input.clone()
        for block in range(chain.num_blocks):
            stage = runnable(chain.stage_module(block, block + 1), example_input.device)
            inp = x.detach().requires_grad_(x.is_floating_point())
            with Recorder() as rec:
                out = stage(inp.clone() if inp.requires_grad else inp)
            times = []
            for _ in range(repeats + 1):
                replayer = Replayer(rec.outputs)
                start = now(x)
                with replayer:
                    stage(inp.clone() if inp.requires_grad else inp)
                times.append(now(x) - start)
                replayer.finish()
            recorded = sum(t.numel() * t.element_size() for t in rec.outputs)
            weights = sum(
                t.numel() * t.element_size() for t in [*stage.parameters(), *stage.buffers()] if t.is_floating_point()
            )
            results.append((statistics.median(times[1:]), recorded, weights))
            x = out.detach()
    return results


def record(module: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``module(x)`` as a training forward would run it (on a leaf copy of ``x`` that requires grad, so the ops
    are the ones the backward worker will replay), and the recording; no graph is kept."""
    leaf = x.detach().requires_grad_(x.is_floating_point())
    with torch.enable_grad(), Recorder() as rec:
        out = module(leaf.clone() if leaf.requires_grad else leaf)
    return out.detach(), rec.outputs
