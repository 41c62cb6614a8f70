"""Lee et al.'s overlapped averaging: each copy of a stage steps only its 1/n shard of the stage.

Over a stage's averaging group of ``n`` ranks (every copy of the stage in every pipeline,
`lightning_cmp.runtime.groups`), each bucket of the stage's weights is one padded flat buffer whose slices the
parameters become. As soon as backward has completed a bucket's gradients, a reduce-scatter starts: rank ``i``
of the group receives the sum of slice ``i`` of every copy's bucket gradient. The optimizer holds one *shard*
parameter per bucket (a view of slice ``i`` of the flat weights) instead of the stage's parameters, so it updates
and keeps state (momentum, Adam's moments) for 1/n of the stage only. After the optimizer step an all-gather of
the updated slices starts, issued first-layer-first. As in the paper, the next forward waits for each bucket only
just before the first layer that uses it: a forward pre-hook on that layer's module (found by walking the stage's
``fx`` graph in execution order), so the later buckets' gathers are hidden behind the forward of the earlier layers.
A bucket whose first use is not a module call (a parameter read directly) is waited for at the stage's start.

Exact: every element is updated by exactly one rank, with the averaged gradient and that element's optimizer
state, which is what every copy would have computed (element-wise optimizers: SGD, Adam, AdamW, RMSprop...; not
ones that look at a whole parameter, such as LAMB's trust ratio or Adafactor's factored moments).

`unshard_state` and `drop_unsharded_state` give checkpoints the usual per-parameter optimizer state, and `shard`
slices a restored state, so a run resumes with any number of pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.runtime.comm import Comm
from lightning_cmp.runtime.stage import StageCopy
from lightning_cmp.runtime.state import find_tensor

__all__ = ["Shards"]

_BUCKET_BYTES = 16 << 20


@dataclass
class _Bucket:
    """Parameters of one stage copy (one dtype, one optimizer group) laid out in one padded flat buffer."""

    params: list[nn.Parameter]
    twins: list[nn.Parameter]  # the second copy's parameters when both copies of the stage live here
    group: int  # the optimizer's param group they belong to
    flat: Tensor  # the weights; ``params`` (and ``twins``) are views of it
    grads: Tensor  # the flat gradient sent by the reduce-scatter
    received: Tensor  # this rank's slice of the summed gradient
    flags: Tensor  # per parameter: whether some copy got a gradient (summed over the group)
    shard: nn.Parameter  # this rank's slice of ``flat``: what the optimizer steps
    send: Tensor  # the updated slice, copied out for the all-gather
    ready: int = 0
    started: bool = False
    gathering: list[Any] = field(default_factory=list)  # the all-gather in flight since the last optimizer step


@dataclass
class _Copy:
    buckets: list[_Bucket]
    comm: Comm
    started: int = 0  # buckets whose reduce-scatter started this step, in order
    armed: bool = False
    reducing: list[tuple[list[Any], Callable[[], None]]] = field(default_factory=list)
    at_start: list[int] = field(default_factory=list)  # buckets the stage waits for before its forward starts


class Shards:
    """Sharded gradient averaging and optimizer step for this rank's stage copies; see the module docstring.

    ``copies``: this rank's stage copies; ``comms``: stage -> its averaging group; ``num_groups``: pipelines;
    ``optimizer``: already narrowed to this rank's copies (`OptimizerLayout.localize`), state loaded. Its
    parameter lists get each bucket's shard in place of the bucket's parameters, and their state is sliced.
    """

    def __init__(
        self,
        copies: dict[tuple[int, int], StageCopy],
        comms: dict[int, Comm],
        num_groups: int,
        optimizer: Optimizer,
        bucket_bytes: int | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.num_groups = num_groups
        self.copies: dict[tuple[int, int], _Copy] = {}
        self._where: dict[int, tuple[tuple[int, int], int]] = {}
        self._hooks: list[Any] = []
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        for key, stage_copy in sorted(copies.items()):
            replica, stage = key
            if (1 - replica, stage) in self.copies:
                continue  # the second copy of a local pair: its weights alias the first's buckets
            twin = copies.get((1 - replica, stage))
            params = stage_copy.parameters()
            missing = [i for i, p in enumerate(params) if id(p) not in group_of]
            if missing:
                raise CMPConfigError(
                    f"averaging='sharded': {len(missing)} parameter(s) of stage {stage} are not in the optimizer; "
                    "sharding steps every parameter of a stage through the optimizer: give configure_optimizers "
                    "all of self.parameters() (set requires_grad=False on frozen layers), or averaging='gradient'"
                )
            twins = twin.parameters() if twin is not None else []
            comm = comms[stage]
            buckets = self._buckets(params, twins, group_of, comm, bucket_bytes or _BUCKET_BYTES)
            self.copies[key] = _Copy(buckets, comm)
            for index, bucket in enumerate(buckets):
                for p in bucket.params:
                    self._where[id(p)] = (key, index)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
            entry = self.copies[key]
            for one in [stage_copy, *([twin] if twin is not None else [])]:
                entry.at_start = sorted(set(entry.at_start) | self._hook_first_uses(one, entry))
            waiting = key
            stage_copy.before_forward = lambda waiting=waiting: self._wait_at_start(waiting)
            if twin is not None:
                twin.before_forward = stage_copy.before_forward
        self._shard_optimizer()

    # -- layout -------------------------------------------------------------------------------------------
    @staticmethod
    def _buckets(
        params: list[nn.Parameter],
        twins: list[nn.Parameter],
        group_of: dict[int, int],
        comm: Comm,
        bucket_bytes: int,
    ) -> list[_Bucket]:
        """Consecutive parameters of one dtype and optimizer group, about ``bucket_bytes`` each, last layers first
        (the order backward completes them)."""
        order = list(reversed(range(len(params))))
        runs: list[list[int]] = []
        size = 0
        for i in order:
            p = params[i]
            same = runs and (params[runs[-1][0]].dtype, group_of[id(params[runs[-1][0]])]) == (p.dtype, group_of[id(p)])
            if not same or size >= bucket_bytes:
                runs.append([])
                size = 0
            runs[-1].append(i)
            size += p.numel() * p.element_size()
        n, me = comm.size, comm.me
        buckets = []
        for run in runs:
            members = [params[i] for i in run]
            total = sum(p.numel() for p in members)
            chunk = -(-total // n)
            device, dtype = members[0].device, members[0].dtype
            flat = torch.zeros(chunk * n, dtype=dtype, device=device)
            offset = 0
            with torch.no_grad():
                for i in run:
                    for p in [params[i], *([twins[i]] if twins else [])]:
                        flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
                        p.data = flat[offset : offset + p.numel()].view_as(p)
                    offset += params[i].numel()
            shard = nn.Parameter(flat[me * chunk : (me + 1) * chunk])
            buckets.append(
                _Bucket(
                    params=members,
                    twins=[twins[i] for i in run] if twins else [],
                    group=group_of[id(members[0])],
                    flat=flat,
                    grads=torch.zeros_like(flat),
                    received=torch.empty(chunk, dtype=dtype, device=device),
                    flags=torch.zeros(len(run), device=device),
                    shard=shard,
                    send=torch.empty(chunk, dtype=dtype, device=device),
                )
            )
        return buckets

    def _hook_first_uses(self, stage_copy: StageCopy, entry: _Copy) -> set[int]:
        """Make the first module call that uses each bucket (in the stage's graph order) wait for its gather; return
        the buckets to wait for at the stage's start instead (no graph, first use not a module call, not used)."""
        everything = set(range(len(entry.buckets)))
        graph = getattr(stage_copy.module, "graph", None)
        if graph is None or stage_copy.lead is not None or stage_copy.weights is not None:
            return everything
        bucket_of: dict[int, int] = {}
        for b, bucket in enumerate(entry.buckets):
            for p in [*bucket.params, *bucket.twins]:
                bucket_of[id(p)] = b
        seen: set[int] = set()
        at_start: set[int] = set()
        for node in graph.nodes:
            if node.op == "call_module":
                module = stage_copy.module.get_submodule(node.target)
                hit = {bucket_of[id(p)] for p in module.parameters() if id(p) in bucket_of} - seen
                if hit:
                    self._hooks.append(module.register_forward_pre_hook(_waiter(entry, sorted(hit))))
            elif node.op == "get_attr":
                read = find_tensor(stage_copy.module, str(node.target))
                hit = ({bucket_of[id(read)]} if id(read) in bucket_of else set()) - seen
                at_start |= hit
            else:
                continue
            seen |= hit
        return at_start | (everything - seen)

    def _wait_at_start(self, key: tuple[int, int]) -> None:
        entry = self.copies[key]
        for index in entry.at_start:
            _wait_bucket(entry, index)

    def _buckets_all(self) -> list[_Bucket]:
        return [b for c in self.copies.values() for b in c.buckets]

    def _shard_optimizer(self) -> None:
        """The optimizer steps the shards: each bucket's parameters leave its group, their state is sliced."""
        state = self.optimizer.state
        replaced: set[int] = set()
        for entry in self.copies.values():
            for bucket in entry.buckets:
                sliced = _slice_state([state.get(p) for p in bucket.params], bucket, entry.comm.me)
                if sliced is not None:
                    state[bucket.shard] = sliced
                for p in [*bucket.params, *bucket.twins]:
                    state.pop(p, None)
                    replaced.add(id(p))
        for index, group in enumerate(self.optimizer.param_groups):
            kept = [p for p in group["params"] if id(p) not in replaced]
            group["params"] = kept + [b.shard for b in self._buckets_all() if b.group == index]

    # -- one step -----------------------------------------------------------------------------------------
    def arm(self, key: tuple[int, int]) -> None:
        """From now on start each bucket's reduce-scatter as soon as backward has completed it, in order."""
        entry = self.copies[key]
        entry.armed, entry.started = True, 0
        for bucket in entry.buckets:
            bucket.ready, bucket.started = 0, False

    def _on_grad(self, p: Tensor) -> None:
        key, index = self._where[id(p)]
        entry = self.copies[key]
        if not entry.armed:
            return
        entry.buckets[index].ready += 1
        while entry.started < len(entry.buckets) and entry.buckets[entry.started].ready >= len(
            entry.buckets[entry.started].params
        ):
            self._start_bucket(key, entry.started)
            entry.started += 1

    def start(self, key: tuple[int, int]) -> None:
        """Start what is left of this copy's reduce-scatters (both copies' gradients summed first for a local pair)."""
        entry = self.copies[key]
        for index in range(entry.started, len(entry.buckets)):
            self._start_bucket(key, index)
        entry.started, entry.armed = len(entry.buckets), False

    def _start_bucket(self, key: tuple[int, int], index: int) -> None:
        entry = self.copies[key]
        bucket = entry.buckets[index]
        if bucket.started:
            return
        bucket.started = True
        offset = 0
        with torch.no_grad():
            for i, p in enumerate(bucket.params):
                grads = [g for g in (p.grad, *(t.grad for t in bucket.twins[i : i + 1])) if g is not None]
                view = bucket.grads[offset : offset + p.numel()]
                if grads:
                    view.copy_(grads[0].reshape(-1))
                    for extra in grads[1:]:
                        view.add_(extra.reshape(-1))
                else:
                    view.zero_()
                bucket.flags[i] = float(bool(grads))
                offset += p.numel()
                p.grad = None  # the shard's gradient is what the optimizer uses
                for t in bucket.twins[i : i + 1]:
                    t.grad = None
        works = entry.comm.start_reduce_scatter(bucket.received, bucket.grads) + entry.comm.start_all_reduce(
            bucket.flags
        )

        def finish() -> None:
            unused = [i for i, used in enumerate(bucket.flags.tolist()) if not used]
            if unused:
                shapes = [tuple(bucket.params[i].shape) for i in unused]
                raise CMPConfigError(
                    f"averaging='sharded': {len(unused)} parameter(s) of shapes {shapes[:4]} got no gradient in this "
                    "step on any worker; a shard is stepped as a whole, so momentum and weight decay would move "
                    "them where one device leaves them alone. Remove unused layers or use averaging='gradient'"
                )
            grad = bucket.received.div(self.num_groups)  # each pipeline's copies sum to its own batch's gradient
            shard = bucket.shard
            shard.grad = grad if shard.grad is None else shard.grad.add_(grad)

        entry.reducing.append((works, finish))

    def wait(self) -> None:
        """Finish every reduce-scatter started: the shards hold their averaged gradients (and every gather has
        arrived, also of buckets no forward used: the optimizer step writes into the buffers they fill)."""
        self.wait_gathers()
        for entry in self.copies.values():
            for works, finish in entry.reducing:
                entry.comm.wait(works, None)
                finish()
            entry.reducing.clear()
            entry.started, entry.armed = 0, False  # the next backward starts from the first bucket again
            for bucket in entry.buckets:
                bucket.ready, bucket.started = 0, False

    def start_gathers(self) -> None:
        """After the optimizer step: send each updated shard to every copy, first layers first."""
        for entry in self.copies.values():
            for bucket in reversed(entry.buckets):
                bucket.send.copy_(bucket.shard.detach())
                bucket.gathering = entry.comm.start_all_gather(bucket.flat, bucket.send)

    def wait_gathers(self, key: tuple[int, int] | None = None) -> None:
        """Wait until the updated weights of copy ``key`` (every copy: None) are in place."""
        entries = self.copies.values() if key is None else [self.copies[key]] if key in self.copies else []
        for entry in entries:
            for index in reversed(range(len(entry.buckets))):  # the order they were issued in
                _wait_bucket(entry, index)

    def close(self, drain: bool = True) -> None:
        if drain:
            self.wait()
            self.wait_gathers()
        else:
            Comm.abandon([(e.reducing, e.buckets) for e in self.copies.values()])
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- checkpoints -----------------------------------------------------------------------------------------
    def unshard_state(self) -> None:
        """Put each parameter's whole optimizer state back in ``optimizer.state`` (a collective over every averaging
        group): what a checkpoint saves. `drop_unsharded_state` removes it again."""
        self.wait_gathers()
        state = self.optimizer.state
        # blocking collectives in several groups: every rank takes its stages in the same (stage) order
        for _, entry in sorted(self.copies.items(), key=lambda item: item[0][1]):
            for bucket in entry.buckets:
                mine = state.get(bucket.shard, {})
                keys = entry.comm.all_gather_object(sorted(mine))
                if any(k != keys[0] for k in keys):
                    raise RuntimeError(f"the shards of one bucket hold different optimizer state keys: {keys}")
                whole: dict[str, Any] = {}
                for name in keys[0]:
                    value = mine[name]
                    if isinstance(value, Tensor) and value.shape == bucket.shard.shape:
                        out = torch.empty(bucket.flat.numel(), dtype=value.dtype, device=value.device)
                        entry.comm.wait(entry.comm.start_all_gather(out, value.contiguous()), None)
                        whole[name] = out
                    else:
                        whole[name] = value
                offset = 0
                for p in bucket.params:
                    per: dict[str, Any] = {}
                    for name, value in whole.items():
                        if isinstance(value, Tensor) and value.numel() == bucket.flat.numel() and value.dim() == 1:
                            per[name] = value[offset : offset + p.numel()].view_as(p).clone()
                        else:
                            per[name] = value.clone() if isinstance(value, Tensor) else value
                    if per:
                        state[p] = per
                    offset += p.numel()

    def drop_unsharded_state(self) -> None:
        for bucket in self._buckets_all():
            for p in bucket.params:
                self.optimizer.state.pop(p, None)

    def unshard(self) -> None:
        """Give the optimizer back the stage parameters with their whole state (at the end of training)."""
        self.unshard_state()
        state = self.optimizer.state
        for index, group in enumerate(self.optimizer.param_groups):
            shards = {id(b.shard) for b in self._buckets_all() if b.group == index}
            kept = [p for p in group["params"] if id(p) not in shards]
            group["params"] = kept + [p for b in self._buckets_all() if b.group == index for p in b.params]
        for bucket in self._buckets_all():
            state.pop(bucket.shard, None)


def _wait_bucket(entry: _Copy, index: int) -> None:
    bucket = entry.buckets[index]
    if bucket.gathering:
        works, bucket.gathering = bucket.gathering, []
        entry.comm.wait(works, None)


def _waiter(entry: _Copy, indices: list[int]) -> Callable[..., None]:
    """A forward pre-hook waiting for the gathers of ``indices`` (the buckets this module is the first to use)."""

    def hook(module: nn.Module, args: Any) -> None:
        for index in indices:
            _wait_bucket(entry, index)

    return hook


def _slice_state(states: list[dict[str, Any] | None], bucket: _Bucket, me: int) -> dict[str, Any] | None:
    """This rank's slice of the parameters' optimizer states, laid out like the bucket (a restored checkpoint)."""
    present = [s for s in states if s]
    if not present:
        return None
    if len(present) != len(states):
        raise CMPConfigError(
            "averaging='sharded': the restored optimizer state covers only some parameters of a bucket"
        )
    chunk = bucket.shard.numel()
    out: dict[str, Any] = {}
    for name, value in present[0].items():
        per_param = all(
            isinstance(s.get(name), Tensor) and s[name].shape == p.shape
            for s, p in zip(present, bucket.params, strict=True)
        )
        if per_param:
            flat = torch.zeros(bucket.flat.numel(), dtype=value.dtype, device=bucket.flat.device)
            offset = 0
            for s, p in zip(present, bucket.params, strict=True):
                flat[offset : offset + p.numel()].copy_(s[name].reshape(-1))
                offset += p.numel()
            out[name] = flat[me * chunk : (me + 1) * chunk].clone()
        else:
            out[name] = value
    return out
