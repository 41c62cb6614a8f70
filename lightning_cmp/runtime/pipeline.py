"""One rank's view of a split model: its stage copies, the lowered programs and a differentiable forward."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cmp.errors import CMPConfigError, CopiesDriftedError, MicrobatchLossMismatch
from lightning_cmp.partition import Chain, check_bipartition_cuts
from lightning_cmp.partition.materialize import has_meta, materialize, release
from lightning_cmp.runtime.averaging import Averager
from lightning_cmp.runtime.comm import Comm, message_tag
from lightning_cmp.runtime.executor import Executor, Step
from lightning_cmp.runtime.groups import DataGroups
from lightning_cmp.runtime.rng import ForwardSeeds
from lightning_cmp.runtime.sharded import Shards
from lightning_cmp.runtime.stage import StageCopy
from lightning_cmp.runtime.state import fill, find_tensor, gather_tree
from lightning_cmp.schedule import Placement, StageCosts, get_schedule, lower, lower_forward_only, split_phases

__all__ = ["LossFn", "Pipeline"]

AVERAGING = ("gradient", "parameter", "sharded")
_MIRROR_MSG = 8  # message kind: the weights of a stage's lead blocks, sent to the worker that runs their forward
#: the tensors of one mirror refresh message, its peer and its tag
_MirrorMessage = tuple[list[Tensor], int, int]

#: ``loss_fn(rows, output)``: the caller's (mean-reduced) loss of the batch rows ``rows`` given their ``output``.
LossFn = Callable[[slice, Tensor], Tensor]


class Pipeline:
    """Stages of ``chain`` cut at ``cuts``, run by ``schedule`` over the ranks of ``comm``.

    Calling the pipeline runs the forward phase on every rank and returns the whole batch's output on
    every rank, so the caller's loss, metrics and logging are computed exactly as on one device. Its
    backward (``loss.backward()``) runs the backward phase, including the averaging of stage copies.

    A schedule that interleaves forwards and backwards (``cmp`` with microbatches) needs each microbatch's
    loss before the whole output exists: the caller passes ``loss_fn(rows, output)`` (its loss on the batch
    rows ``rows``), the call runs the whole step (every forward, loss and backward, and the averaging) with
    each microbatch's loss weighted by its share of the batch, and returns the whole output; its gradients
    wait aside until ``loss.backward()`` on the caller's loss of that output. That backward checks the
    caller's output gradient against the microbatches' (one scale for all of them: Lightning's gradient
    accumulation and loss scaling) and puts the gradients in place, scaled alike; a loss that mixes samples
    is refused there (`MicrobatchLossMismatch`, on every rank).

    ``forward_cuts`` (Bi-Partition; default ``cuts``): where the training forward is cut, ``cuts`` being where
    the backward is (and what each stage's rank owns, steps and saves). Stage ``s + 1``'s blocks
    ``[cuts[s], forward_cuts[s])`` run their training forward on stage ``s``'s rank, which holds a copy of their
    weights refreshed before every training step; the next rank rebuilds their graph from a recording of that
    forward (`lightning_cmp.runtime.replay`). ``forward_cuts[s] >= cuts[s]``; evaluation runs layer-wise.

    A rank holds only its stages: at construction it gives them their values (from ``state``, a checkpoint
    being restored; else from a rank that holds them; else a seeded ``reset_parameters()`` when the model was
    built on the meta device) and releases every other stage's tensors to the meta device (same shape, no
    memory, same Python objects). `full_state_dict` and `restore_full_module` gather them on one rank.

    ``data`` (several pipelines training data-parallel; ``comm`` is then this rank's pipeline,
    ``data.pipeline``): every copy of a stage in every pipeline is averaged with the others (gradients summed
    over each pipeline's copies and averaged over the pipelines: exact SGD on the union of the pipelines' batches),
    all pipelines start from pipeline 0's values, and each pipeline draws its own dropout masks.

    Examples:
        >>> pipe = Pipeline(trace_chain(net), cuts=[3], schedule="cmp", comm=comm)  # doctest: +SKIP
        >>> loss = F.cross_entropy(pipe(x), y); loss.backward(); optimizer.step()  # doctest: +SKIP
    """

    def __init__(
        self,
        chain: Chain,
        cuts: list[int],
        schedule: str,
        comm: Comm,
        averaging: str = "gradient",
        num_microbatches: int = 1,
        bucket_bytes: int | None = None,
        shared_memory: bool = True,
        seed: int = 0,
        state: Mapping[str, Tensor] | None = None,
        stage_costs: StageCosts | None = None,
        forward_cuts: list[int] | None = None,
        data: DataGroups | None = None,
    ) -> None:
        if averaging not in AVERAGING:
            raise CMPConfigError(f"averaging={averaging!r}; valid: {', '.join(map(repr, AVERAGING))}")
        spec = get_schedule(schedule)
        chain.check_cuts_share_nothing(cuts)
        forward_cuts = list(cuts) if forward_cuts is None else list(forward_cuts)
        if forward_cuts != list(cuts):
            chain.check_cuts_share_nothing(forward_cuts)
            check_bipartition_cuts(
                forward_cuts, cuts, chain.num_blocks, len(cuts) + 1, chain.forbidden_cuts(), forward_ahead=True
            )
        self.chain = chain
        self.cuts = list(cuts)
        self.forward_cuts = forward_cuts
        self.comm = comm
        self.data = data
        self.averaging = averaging
        self.num_microbatches = num_microbatches
        self.placement = Placement(len(cuts) + 1, spec.num_replicas)
        # The same on every rank: an interleaved order is built for the measured costs when given.
        timetable = spec.timetable(self.placement.num_stages, num_microbatches, self.placement, stage_costs)
        if averaging == "sharded" and data is None:
            raise CMPConfigError("averaging='sharded' shards each stage over its averaging group: pass data=DataGroups")
        # "sharded" averages the gradients too (reduce-scatter instead of all-reduce; see `shard`)
        gradients = averaging in ("gradient", "sharded")
        self._averages_gradients = gradients and (spec.num_replicas == 2 or data is not None)
        self.loss_per_microbatch = spec.loss_per_microbatch(num_microbatches)
        #: applied to each microbatch's weighted loss before its backward (e.g. a GradScaler's ``scale``)
        self.loss_scale: Callable[[Tensor], Tensor] | None = None
        lowered = lower(timetable, self.placement, num_microbatches, self._averages_gradients, self.loss_per_microbatch)
        program = lowered[comm.me]
        self.forward_actions, self.backward_actions = split_phases(program)
        self.eval_actions = lower_forward_only(timetable, self.placement, num_microbatches)[comm.me]
        self.seed = seed
        # every stage forward draws dropout masks from its own seed; each pipeline from its own ones
        self.seeds = ForwardSeeds(seed if data is None else seed + (data.group << 32))
        if not comm.processes:  # a world Comm from the strategy has them already
            comm.gather_processes()
        fill(chain.root, self.local_names(), comm, seed, state)
        # Tensors no stage uses (an unused branch) stay on every rank; one built on the meta device gets memory.
        materialize(chain.root, comm.device, seed, self._unstaged_names())
        self.copies = self._build_copies(seed)
        if data is not None:
            data.broadcast_values(self.copies)
        self._mirror_sends, self._mirror_receives = self._mirror_messages()
        mirrors_share = shared_memory and spec.num_replicas == 2 and data is None
        averager = Averager(comm, self.copies, bucket_bytes, mirrors_share, data)
        self.executor = Executor(self.placement, comm, self.copies, averager)
        self._release_non_local()

    def shard(self, optimizer: torch.optim.Optimizer, bucket_bytes: int | None = None) -> Shards:
        """Lee et al.'s form of ``averaging="sharded"``: ``optimizer`` (narrowed to this rank's copies, state
        loaded) steps only this rank's shard of each stage; call `after_optimizer_step` after each of its steps."""
        assert self.data is not None
        shards = Shards(self.copies, self.data.stages, self.data.num_groups, optimizer, bucket_bytes)
        self.executor.averager.shards = shards
        return shards

    @property
    def shards(self) -> Shards | None:
        return self.executor.averager.shards

    def after_optimizer_step(self) -> None:
        """Start sending the updated shards to every copy (waited for before each stage's next forward)."""
        if self.shards is not None:
            self.shards.start_gathers()

    def wait_parameters(self) -> None:
        """Every copy holds its stage's current weights (sharded averaging: the gathers have arrived)."""
        if self.shards is not None:
            self.shards.wait_gathers()

    def close(self, drain: bool = True) -> None:
        """Detach from the model: remove the averaging hooks from its parameters (call once training ends).

        ``drain`` first waits for the messages still in flight (pass ``False`` after a failure: a peer may be gone).
        """
        if drain:
            self.comm.wait_sends()
        else:
            self.comm.abandon_sends()
        self.executor.averager.close(drain)

    @property
    def num_replicas(self) -> int:
        return self.placement.num_replicas

    def stage_bounds(self) -> list[int]:
        return [0, *self.cuts, self.chain.num_blocks]

    def __call__(self, x: Tensor, step: int | None = None, loss_fn: LossFn | None = None) -> Tensor:
        """The whole batch's output; ``step`` (e.g. the trainer's global step) keys the random numbers.

        ``loss_fn`` is required in training when ``loss_per_microbatch`` (see the class docstring).

        Each stage forward draws from a seed made of (``seed``, ``step``, replica, stage, microbatch), so the two
        replicas' halves and the microbatches get independent dropout masks, and a run restarted from a
        checkpoint at step ``step`` draws what the uninterrupted run drew. ``step=None`` counts the calls.
        """
        if not isinstance(x, Tensor):
            raise TypeError(
                f"the split module received a {type(x).__name__}; lightning_cmp pipelines take one tensor. "
                "Pass module='<submodule>' to split a submodule that is called with a tensor."
            )
        if x.requires_grad and torch.is_grad_enabled():
            raise CMPConfigError(
                "the split module's input requires grad (trainable layers run before it); split the whole "
                "model instead (module=None) or move those layers inside the split module"
            )
        self._check_same_input(x)
        if not torch.is_grad_enabled():
            state = self._new_step(x, training=False, step_index=step)
            self.executor.run(self.eval_actions, state)
            return self._assemble(state)
        return self._train(x, step, loss_fn)

    def _train(self, x: Tensor, step: int | None, loss_fn: LossFn | None) -> Tensor:
        """One training step's output, connected to the caller's graph (see `__call__`)."""
        if self.loss_per_microbatch and loss_fn is None:
            raise CMPConfigError(
                f"{self.num_microbatches} microbatches of a schedule that interleaves forwards and backwards: "
                "the pipeline computes each microbatch's loss itself; call it as pipeline(x, loss_fn=fn) with "
                "fn(rows, output) -> the mean loss of the batch rows `rows`"
            )
        anchor = torch.empty(0, requires_grad=True)
        out: Tensor = _PipelineFunction.apply(self, anchor, x, step, loss_fn)
        return out

    def _check_same_input(self, x: Tensor) -> None:
        """Every rank must be called with the same batch; a cheap fingerprint catches a sampler that differs."""
        probes = self.comm.all_gather(_fingerprint(x).to(self.comm.device))
        differ = [rank for rank, p in enumerate(probes) if not torch.equal(p, probes[0])]
        if differ:
            raise CMPConfigError(
                f"rank(s) {differ} of the pipeline received a different batch than rank 0 (batch sizes "
                f"{[int(p[0]) for p in probes]}): every worker of one pipeline must see the same batch, or inputs "
                "and labels silently come from different samples. With Lightning keep use_distributed_sampler=True "
                "(the default) or give every worker the same sampler and seed."
            )

    # -- phases -----------------------------------------------------------------------------------------
    def _new_step(self, x: Tensor, training: bool, step_index: int | None = None) -> Step:
        inputs = {}
        for replica, half in enumerate(x.tensor_split(self.num_replicas)):
            for mb, part in enumerate(half.tensor_split(self.num_microbatches)):
                inputs[(replica, mb)] = part
        return Step(training=training, inputs=inputs, seed_key=self.seeds.key(step_index, training))

    @staticmethod
    def _rows(step: Step) -> dict[tuple[int, int], slice]:
        """The batch rows of each (replica, microbatch), in the order the batch was split."""
        rows, offset = {}, 0
        for key in sorted(step.inputs):
            size = int(step.inputs[key].shape[0])
            rows[key] = slice(offset, offset + size)
            offset += size
        return rows

    def _assemble(self, step: Step) -> Tensor:
        keys = sorted(step.outputs)
        return torch.cat([step.outputs[k] for k in keys])

    def run_forward(
        self, x: Tensor, step_index: int | None = None, loss_fn: LossFn | None = None
    ) -> tuple[Tensor, Step]:
        step = self._new_step(x, training=True, step_index=step_index)
        self._refresh_mirrors(step)
        if loss_fn is not None:
            step.output_grad = self._output_grad_fn(step, loss_fn)
        try:
            self.executor.run(self.forward_actions, step)
        except ValueError as err:
            if "Expected more than 1 value per channel" not in str(err):
                raise
            sizes = [int(part.shape[0]) for _, part in sorted(step.inputs.items())]
            raise CMPConfigError(
                f"a batch of {x.shape[0]} samples is split into microbatches of {sizes} samples ({self.num_replicas} "
                f"replica(s) x {self.num_microbatches} microbatch(es)) and a BatchNorm layer in training mode cannot "
                f"train on 1 value per channel (torch: {err}); use DataLoader(drop_last=True) to skip a short last "
                f"batch, or batches of at least {2 * self.num_replicas * self.num_microbatches} samples"
            ) from err
        return self._assemble(step), step

    def _output_grad_fn(self, step: Step, loss_fn: LossFn) -> Callable[[tuple[int, int], Tensor], Tensor]:
        """What a LOSS action calls: ``loss_fn`` on one microbatch, weighted by its share, differentiated."""
        rows = self._rows(step)
        total = sum(r.stop - r.start for r in rows.values())

        def output_grad(key: tuple[int, int], output: Tensor) -> Tensor:
            size = rows[key].stop - rows[key].start
            if size == 0:  # a short last batch left this microbatch empty
                return torch.zeros_like(output)
            # the share of the batch this microbatch's mean loss stands for (its replica's, under parameter
            # averaging, where each replica trains as if on its own half)
            weight = size / (self._replica_rows(rows, key[0]) if self._averages_parameters else total)
            leaf = output.requires_grad_()
            with torch.enable_grad():
                loss = loss_fn(rows[key], leaf)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise CMPConfigError(
                        f"the loss of microbatch {key} is {type(loss).__name__}"
                        f"{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}; "
                        "it must be a tensor holding one number (a mean over the microbatch's samples)"
                    )
                scaled = loss.reshape(()) * weight
                scaled = self.loss_scale(scaled) if self.loss_scale is not None else scaled
                (grad,) = torch.autograd.grad(scaled, leaf, allow_unused=True)
            return grad if grad is not None else torch.zeros_like(output)

        return output_grad

    @property
    def _averages_parameters(self) -> bool:
        return self.averaging == "parameter" and self.num_replicas == 2

    @staticmethod
    def _replica_rows(rows: Mapping[tuple[int, int], slice], replica: int) -> int:
        return sum(r.stop - r.start for k, r in rows.items() if k[0] == replica)

    def output_grad_scale(self, step: Step, grad: Tensor, tolerance: float = 1e-3) -> float:
        """The one factor ``c`` with ``grad`` (the caller's output gradient) = c x the microbatches' output
        gradients used in ``step``; raises `MicrobatchLossMismatch` on every rank when there is none (a collective).

        Backward is linear in the output gradient, so scaling the step's gradients by ``c`` gives exactly what
        the caller's loss asks for, whatever it multiplied its loss by (Lightning divides it by
        ``accumulate_grad_batches``; a summed loss weighs every sample alike).
        """
        rows = self._rows(step)
        total = sum(r.stop - r.start for r in rows.values())
        sums = torch.zeros(3, dtype=torch.float64)
        for key, mine in step.output_grads.items():
            part = grad[rows[key]].double()
            if self._averages_parameters:  # each replica's gradients stand for its own half batch
                part = part * (total / self._replica_rows(rows, key[0]))
            ours = mine.double()
            sums += torch.stack([(part * ours).sum(), (ours * ours).sum(), (part * part).sum()]).cpu()
        theirs_ours, ours_sq, theirs_sq = self.comm.all_reduce_sum(sums.to(self.comm.device)).tolist()
        if ours_sq == 0.0:
            scale = 1.0
        else:
            scale = theirs_ours / ours_sq
        if not math.isfinite(scale) or not math.isfinite(theirs_sq):
            return scale  # an overflow under loss scaling: the scaler skips this step
        residual = max(theirs_sq - scale * theirs_ours, 0.0) if ours_sq else theirs_sq
        if residual > (tolerance**2) * theirs_sq:
            raise MicrobatchLossMismatch(
                f"the gradient of the step's loss with respect to the model's output differs from the one the "
                f"{self.num_microbatches} microbatches' losses gave (relative difference "
                f"{math.sqrt(residual / theirs_sq):.3g}). With num_microbatches > 1, `cmp` computes each "
                "microbatch's gradient from the loss of that microbatch alone, which is exact for a loss made of "
                "per-sample terms (F.cross_entropy, mse_loss: a mean, or a sum over microbatches of equal size) but "
                "not for one that mixes samples (batch statistics, contrastive pairs, a penalty on the whole "
                "output). Use a per-sample loss, or num_microbatches=1, or schedule='gpipe'"
            )
        return scale

    def run_backward(self, step: Step, grad: Tensor) -> None:
        total = grad.shape[0]
        offset = 0
        for key in sorted(step.outputs):
            rows = step.outputs[key].shape[0]
            part = grad[offset : offset + rows]
            offset += rows
            if self.averaging == "parameter" and self.num_replicas == 2 and rows:
                # Each replica trains as if on its own half batch (mean-reduced loss): scale by N / n_replica.
                replica_rows = sum(step.outputs[k].shape[0] for k in step.outputs if k[0] == key[0])
                part = part * (total / replica_rows)
            step.output_grads[key] = part
        # Average only this backward's gradients; earlier ones (accumulation, a second forward) are added
        # back afterwards, or they would be counted twice.
        fresh = _FreshGradients(self.local_parameters()) if self._averages_gradients else nullcontext()
        with fresh:
            self.executor.run(self.backward_actions, step)

    # -- stage copies -----------------------------------------------------------------------------------
    def _build_copies(self, seed: int) -> dict[tuple[int, int], StageCopy]:
        bounds = self.stage_bounds()
        copies: dict[tuple[int, int], StageCopy] = {}
        originals: dict[int, nn.Module] = {}
        for replica, stage in self.placement.stages_on(self.comm.me):
            module = self.chain.stage_module(bounds[stage], bounds[stage + 1])
            twin = None
            if stage in originals:  # both copies of a stage here: the second one gets its own weights
                module, twin = copy.deepcopy(module), originals[stage]
            else:
                originals[stage] = module
            copies[(replica, stage)] = StageCopy(
                replica, stage, module, twin, lead=self._lead(stage, module), tail=self._tail(stage, seed)
            )
        return copies

    def _zone(self, stage: int) -> tuple[int, int]:
        """Blocks ``[lo, hi)`` of stage ``stage + 1`` whose training forward runs on stage ``stage``'s rank."""
        return self.cuts[stage], self.forward_cuts[stage]

    def _lead(self, stage: int, module: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
        if stage == 0:
            return None
        lo, hi = self._zone(stage - 1)
        if lo == hi:
            return None
        stop = self.stage_bounds()[stage + 1]
        rest = self.chain.stage_module(hi, stop, root=module) if hi < stop else None
        return self.chain.stage_module(lo, hi, root=module), rest

    def _tail(self, stage: int, seed: int) -> tuple[nn.Module, nn.Module] | None:
        if stage == self.placement.num_stages - 1:
            return None
        lo, hi = self._zone(stage)
        if lo == hi:
            return None
        original = self.chain.stage_module(lo, hi)
        mirror = copy.deepcopy(original)  # its values come from the owner before every training step
        if has_meta(mirror):
            materialize(mirror, self.comm.device, seed)
        for tensor in [*mirror.parameters(), *mirror.buffers()]:
            tensor.data = tensor.data.contiguous()  # received in place (e.g. from channels_last weights)
        return mirror, original

    def _mirror_messages(self) -> tuple[list[_MirrorMessage], dict[tuple[int, int], _MirrorMessage]]:
        """The tensors each mirror refresh sends (this rank owns lead blocks) and receives (this rank runs a tail),
        with peer and tag; found once by name, the same Python objects every step."""
        sends, receives = [], {}
        for (replica, stage), stage_copy in self.copies.items():
            if stage_copy.lead is not None:
                names = self._zone_names(stage - 1)
                tensors = [t for n in names if (t := find_tensor(stage_copy.module, n)) is not None]
                sends.append(
                    (tensors, self.placement.rank(replica, stage - 1), message_tag(_MIRROR_MSG, replica, stage, 0))
                )
            if stage_copy.tail is not None:
                names = self._zone_names(stage)
                tensors = [t for n in names if (t := find_tensor(stage_copy.tail[0], n)) is not None]
                peer, tag = self.placement.rank(replica, stage + 1), message_tag(_MIRROR_MSG, replica, stage + 1, 0)
                receives[(replica, stage)] = (tensors, peer, tag)
        return sends, receives

    def _zone_names(self, stage: int) -> list[str]:
        params, buffers = self.chain.stage_state_names(*self._zone(stage))
        return [*params, *buffers]

    def _refresh_mirrors(self, step: Step) -> None:
        """At the start of a training step each owner of lead blocks starts sending their current weights and
        buffers to the rank that runs their forward, straight into its mirror; that rank waits for them only
        when it reaches the mirror (`Step.mirrors_arriving`), so the transfer overlaps its own stage's forward.
        A no-op without Bi-Partition."""
        for tensors, peer, tag in self._mirror_sends:
            self.comm.isend_into_place(tensors, peer, tag)
        for key, (tensors, peer, tag) in self._mirror_receives.items():
            step.mirrors_arriving[key] = (self.comm.irecv_into(tensors, peer, tag), peer)

    def local_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.copies.values() for p in c.parameters()]

    def copies_of(self, name: str) -> list[Tensor]:
        """The local tensors (0, 1 or 2) that hold parameter or buffer ``name`` of the traced module."""
        found: list[Tensor] = []
        for c in self.copies.values():
            tensor = find_tensor(c.module, name)
            if tensor is not None and all(tensor is not f for f in found):
                found.append(tensor)
        return found

    def owners(self) -> dict[str, int]:
        """Each staged parameter or buffer name -> the rank holding its replica-A copy (its source in a gather)."""
        bounds = self.stage_bounds()
        found: dict[str, int] = {}
        for stage in range(self.placement.num_stages):
            params, buffers = self.chain.stage_state_names(bounds[stage], bounds[stage + 1])
            found.update(dict.fromkeys([*params, *buffers], self.placement.rank(0, stage)))
        return found

    def owned_names(self) -> Iterator[str]:
        """Names whose replica-A copy lives on this rank: this rank is their source when gathering."""
        bounds = self.stage_bounds()
        for stage in range(self.placement.num_stages):
            if self.placement.rank(0, stage) == self.comm.me:
                params, buffers = self.chain.stage_state_names(bounds[stage], bounds[stage + 1])
                yield from params
                yield from buffers

    def staged_names(self) -> set[str]:
        bounds = self.stage_bounds()
        names: set[str] = set()
        for s in range(self.placement.num_stages):
            params, buffers = self.chain.stage_state_names(bounds[s], bounds[s + 1])
            names.update(params, buffers)
        return names

    def local_names(self) -> set[str]:
        """Parameter and buffer names of the stages this rank runs (of either replica)."""
        bounds = self.stage_bounds()
        names: set[str] = set()
        for _, stage in self.placement.stages_on(self.comm.me):
            params, buffers = self.chain.stage_state_names(bounds[stage], bounds[stage + 1])
            names.update(params, buffers)
        return names

    def _unstaged_names(self) -> set[str]:
        root = self.chain.root
        return {n for n, _ in [*root.named_parameters(), *root.named_buffers()]} - self.staged_names()

    def _release_non_local(self) -> None:
        """Free the tensors of the stages other ranks run: they become meta tensors (shape kept, no memory)."""
        local = self.local_names()
        for name in self.staged_names() - local:
            tensor = find_tensor(self.chain.root, name)
            if tensor is not None:
                release(tensor)

    # -- state ------------------------------------------------------------------------------------------
    def full_state_dict(self, dst: int | None = 0) -> dict[str, Tensor] | None:
        """The traced module's whole state dict (CPU tensors) on rank ``dst`` only, None on the others.

        A collective. Each stage comes from the rank holding its replica-A copy, one tensor at a time, so no
        rank but ``dst`` ever holds more than its own stages. ``dst=None``: on every rank (tests, debugging).
        """
        self.wait_parameters()
        mine = {name: t for name in self.owned_names() if (t := find_tensor(self.chain.root, name)) is not None}
        parts = gather_tree(mine, self.comm, 0 if dst is None else dst)
        if dst is None:
            parts = self.comm.broadcast_object(parts, 0)
        if parts is None:
            return None
        merged: dict[str, Tensor] = {}
        for part in parts:
            merged.update(part)
        result = {}
        for name, tensor in self.chain.root.state_dict(keep_vars=True).items():
            result[name] = merged[name] if name in merged else tensor.detach().cpu()
        return result

    def load_full_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy this rank's stages out of a whole (unsplit) state dict into its local copies."""
        self.wait_parameters()
        for name in self.local_names():
            if name in state:
                for tensor in self.copies_of(name):
                    tensor.data.copy_(state[name])

    def restore_full_module(self, dst: int = 0) -> None:
        """Put the whole model back into the traced module on rank ``dst`` (a collective); the other ranks keep
        their own stages."""
        self.wait_parameters()
        needed = self.staged_names() if self.comm.me == dst else set()
        fill(self.chain.root, needed, self.comm, self.seed)

    def average_parameters(self) -> None:
        """Average weights and float buffers of every stage's copies (parameter averaging), over every pipeline."""
        if self.num_replicas == 1 and self.data is None:
            return
        self.wait_parameters()
        for (replica, stage), _ in self.copies.items():
            if self.num_replicas == 1:
                self.executor.averager.start_parameters(replica, stage, self.comm.me)
                continue
            other_rank = self.placement.rank(1 - replica, stage)
            if other_rank == self.comm.me and replica == 1:
                continue  # the local pair is handled once
            self.executor.averager.start_parameters(replica, stage, other_rank)
        self.executor.averager.wait()

    def check_copies(self, when: str = "now") -> None:
        """Raise `CopiesDriftedError` unless both copies of every stage are identical (a collective).

        Cheap: one float64 sum per parameter and floating-point buffer (what the averaging keeps in step; an
        integer buffer may count per replica), exchanged once. With gradient averaging the copies are bitwise
        equal after every step, so any difference means something changed one copy only (code that updates
        parameters in place outside the optimizer, on one worker). ``when`` goes in the message.
        """
        if self.num_replicas == 1 and self.data is None:
            return
        self.wait_parameters()
        bounds = self.stage_bounds()
        names = []
        for s in range(self.placement.num_stages):
            params, buffers = self.chain.stage_state_names(bounds[s], bounds[s + 1])
            floats = [b for b in buffers if _is_float(find_tensor(self.chain.root, b))]
            names.append([*params, *floats])
        group = self.data.group if self.data is not None else 0
        mine: dict[tuple[int, int, int], list[float]] = {}
        for (replica, stage), stage_copy in self.copies.items():
            sums = []
            for name in names[stage]:
                tensor = find_tensor(stage_copy.module, name)
                assert tensor is not None, name
                sums.append(tensor.detach().sum(dtype=torch.float64))
            mine[(group, replica, stage)] = torch.stack(sums).tolist() if sums else []
        every: dict[tuple[int, int, int], list[float]] = {}
        for theirs in (self.data.world if self.data is not None else self.comm).all_gather_object(mine):
            every.update(theirs)
        for (other_group, replica, stage), b in sorted(every.items()):
            a = every[(0, 0, stage)]
            # NaN equals NaN here: a run that diverged on one device diverges alike on both copies.
            index = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y and (x == x or y == y)), None)
            if index is None:
                continue
            name = names[stage][index]
            ranks = sorted({self._global_rank(0, 0, stage), self._global_rank(other_group, replica, stage)})
            where = f"both on rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} and {ranks[1]}"
            head = f"{when}: the two copies of stage {stage} ({where})"
            if self.data is not None:
                head = f"{when}: the copies of stage {stage} ({where}: replica {replica} of pipeline {other_group})"
            raise CopiesDriftedError(
                f"{head} differ, first in {name!r} (sum {a[index]!r} vs "
                f"{b[index]!r}); "
                "they must stay identical. Something changed one copy only: code that updates parameters or "
                "buffers in place outside the optimizer (in training_step or a callback) runs on each worker's own "
                "copy. Make such updates through the optimizer, or in the model's forward"
            )

    def _global_rank(self, group: int, replica: int, stage: int) -> int:
        position = self.placement.rank(replica, stage)
        return self.comm.ranks[position] if self.data is None else self.data.layout.pipeline_ranks(group)[position]

    def clip_grad_norm_(self, max_norm: float, extra: list[Tensor] | None = None) -> Tensor:
        """Clip each replica's gradients by its global 2-norm over all stages (a collective)."""
        zero = torch.zeros((), dtype=torch.float64, device=self.comm.device)
        squares = [zero] * self.num_replicas
        for (replica, _), c in self.copies.items():
            for p in c.parameters():
                if p.grad is not None:
                    squares[replica] = squares[replica] + p.grad.detach().double().pow(2).sum()
        if extra and self.comm.me == 0:  # replicated parameters count once
            shared = sum((g.detach().double().pow(2).sum() for g in extra), zero)
            squares = [s + shared for s in squares]
        norms = self.comm.all_reduce_sum(torch.stack(squares)).sqrt().cpu()
        for (replica, _), c in self.copies.items():
            coef = min(1.0, max_norm / (float(norms[replica]) + 1e-6))
            for p in c.parameters():
                if p.grad is not None and coef < 1.0:
                    p.grad.mul_(coef)
        if extra:
            coef = min(1.0, max_norm / (float(norms[0]) + 1e-6))
            for g in extra:
                if coef < 1.0:
                    g.mul_(coef)
        return norms


class _PipelineFunction(torch.autograd.Function):
    """Connects the pipeline to the caller's autograd graph: its backward runs the backward phase."""

    @staticmethod
    def forward(
        ctx: Any, pipeline: Pipeline, anchor: Tensor, x: Tensor, step_index: int | None, loss_fn: LossFn | None
    ) -> Tensor:
        ctx.pipeline, ctx.fresh = pipeline, None
        if loss_fn is None:
            out, ctx.step = pipeline.run_forward(x, step_index)
            return out
        # The whole step runs now; its gradients wait aside until the caller's backward (Lightning zeroes the
        # gradients between its training_step and its backward).
        with _FreshGradients(pipeline.local_parameters(), keep_fresh=True) as fresh:
            out, ctx.step = pipeline.run_forward(x, step_index, loss_fn)
        ctx.fresh = fresh
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, None, None]:
        if ctx.fresh is not None:
            tolerance = 3e-2 if grad.dtype in (torch.float16, torch.bfloat16) else 1e-3
            ctx.fresh.add_to_gradients(ctx.pipeline.output_grad_scale(ctx.step, grad, tolerance))
        else:
            ctx.pipeline.run_backward(ctx.step, grad)
        ctx.step, ctx.fresh = None, None
        return None, None, None, None, None


class _FreshGradients:
    """Gradients made inside the block, apart from the ones before it: added to them at exit, or with
    ``keep_fresh`` set aside until `add_to_gradients` (the earlier ones are put back at exit)."""

    def __init__(self, params: list[nn.Parameter], keep_fresh: bool = False) -> None:
        self.params = params
        self.keep_fresh = keep_fresh
        self.saved: list[Tensor | None] = []
        self.fresh: list[Tensor | None] = []

    def __enter__(self) -> _FreshGradients:
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.keep_fresh:
            self.fresh = [p.grad for p in self.params]
            for p, old in zip(self.params, self.saved, strict=True):
                p.grad = old
            return
        for p, old in zip(self.params, self.saved, strict=True):
            if old is not None:
                p.grad = old if p.grad is None else old.add_(p.grad)

    def add_to_gradients(self, scale: float = 1.0) -> None:
        for p, new in zip(self.params, self.fresh, strict=True):
            if new is not None:
                new = new.mul_(scale) if scale != 1.0 else new
                p.grad = new if p.grad is None else p.grad.add_(new)
        self.fresh = []


def _is_float(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.is_floating_point()


def _fingerprint(x: Tensor) -> Tensor:
    """Batch size, sums and position-weighted per-sample sums of ``x``: a reordered batch differs too.

    NaN and infinities are counted per sample (weighted by position) instead of summed, so a batch holding a
    corrupt sample still fingerprints the same on every rank. The sums run in float64 straight from ``x`` (no
    float64 copy of the batch: at 32 x 3 x 128 x 128 that copy made the check 10x slower); only a batch whose
    row sums are not all finite pays for the masks.
    """
    with torch.no_grad():
        data = x.detach()
        data = data.flatten(1) if data.dim() > 1 else data.reshape(-1, 1)
        if not data.is_floating_point():
            data = data.double()
        rows = data.sum(1, dtype=torch.float64)
        odd_rows = torch.zeros(len(data), dtype=torch.float64, device=data.device)
        if not bool(rows.isfinite().all()):  # rare: a NaN or an infinity (finite values cannot overflow float64)
            finite = data.isfinite()
            odd_rows = (data.isnan().double() + 2 * data.isposinf().double() + 3 * data.isneginf().double()).sum(1)
            data = data.masked_fill(~finite, 0.0)
            rows = data.sum(1, dtype=torch.float64)
        magnitudes = torch.linalg.vector_norm(data, 1, dim=1, dtype=torch.float64)
        position = torch.arange(1, len(rows) + 1, dtype=torch.float64, device=data.device)
        size = torch.tensor(float(len(rows)), dtype=torch.float64, device=data.device)
        weighted = [(position * r).sum() for r in (rows, magnitudes, odd_rows)]
        return torch.stack([size, rows.sum(), magnitudes.sum(), odd_rows.sum(), *weighted])
