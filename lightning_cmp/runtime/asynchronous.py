"""The asynchronous pipeline: one mini-batch fed per training step, stages updated one by one (PipeDream's 1F1B).

The order of every rank is `lightning_cmp.schedule.asynchronous`; the weights each pass uses are
`lightning_cmp.runtime.weights`; the same `Executor` runs the actions. Mini-batches stay in flight across calls,
so this pipeline keeps one `Step` from one call to the next until it is *drained*.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.partition import Chain
from lightning_cmp.runtime.comm import Comm
from lightning_cmp.runtime.executor import _ACT_MSG, Step
from lightning_cmp.runtime.pipeline import LossFn, Pipeline, _FreshGradients
from lightning_cmp.runtime.weights import StageWeights, check_predictable, update_direction
from lightning_cmp.schedule import Action, Kind, drain_actions, get_schedule, slot_actions

__all__ = ["AsyncPipeline"]


class AsyncPipeline(Pipeline):
    """``chain`` cut at ``cuts`` (one stage per rank, one replica) trained by an asynchronous schedule
    (``"spectrain"``, ``"pipedream"`` or ``"async"``).

    Each training call feeds one mini-batch and returns *that* mini-batch's output on every rank (the last stage's
    rank sends it to the others), so the caller's loss, logging and metrics pair it with its own labels. In the
    same call stage ``k`` runs the backward of the mini-batch fed ``K - k - 1`` calls earlier; its gradients wait
    aside until the caller's ``loss.backward()``, which runs the last stage's backward of this mini-batch, so an
    optimizer step after it applies one mini-batch's gradient on every stage (none on stage ``k`` in the first
    ``K - k - 1`` calls after a fill). `drain` finishes every mini-batch in flight, calling ``update(batch)`` after
    each backward it runs, so N mini-batches make exactly N updates of every stage.

    Evaluation calls (no gradients) run the ordinary forward-only program and need a drained pipeline.

    Examples:
        >>> pipe = AsyncPipeline(trace_chain(net), cuts=[3], schedule="pipedream", comm=comm)  # doctest: +SKIP
        >>> pipe.attach_optimizer(optimizer)  # doctest: +SKIP
        >>> for x, y in batches:  # doctest: +SKIP
        ...     F.cross_entropy(pipe(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        >>> pipe.drain(lambda batch: (optimizer.step(), optimizer.zero_grad()))  # doctest: +SKIP
    """

    def __init__(
        self,
        chain: Chain,
        cuts: list[int],
        schedule: str,
        comm: Comm,
        seed: int = 0,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        spec = get_schedule(schedule)
        if not spec.asynchronous:
            raise CMPConfigError(f"AsyncPipeline runs the asynchronous schedules; {schedule!r} is synchronous")
        super().__init__(chain, cuts, schedule, comm, "gradient", 1, shared_memory=False, seed=seed, state=state)
        assert spec.weights is not None
        self.policy = spec.weights
        self.num_stages = self.placement.num_stages
        for stage_copy in self.copies.values():
            stage_copy.weights = StageWeights(stage_copy.module, self.policy, self.num_stages, stage_copy.stage)
        #: mini-batches fed since the pipeline last filled
        self.fed = 0
        self._state: Step | None = None
        self._pending: tuple[int, list[Action]] | None = None  # the last stage's backward, until the caller's

    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """The optimizer that steps this rank's stage: SpecTrain predicts from its update direction."""
        if self.policy != "predict":
            return
        check_predictable(optimizer)
        direction = update_direction(optimizer)
        for stage_copy in self.copies.values():
            assert stage_copy.weights is not None
            stage_copy.weights.direction = direction

    @property
    def weights(self) -> list[StageWeights]:
        return [c.weights for c in self.copies.values() if c.weights is not None]

    def weight_copy_bytes(self, peak: bool = False) -> int:
        """Bytes of weight copies this rank holds right now (``peak``: the most it held at once so far):
        PipeDream's stashes, SpecTrain's scratch."""
        return sum(w.peak_bytes if peak else w.stashed_bytes() for w in self.weights)

    # -- training -----------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, step: int | None = None, loss_fn: LossFn | None = None) -> Tensor:
        if not torch.is_grad_enabled() and self.fed:
            raise CMPConfigError(
                f"the model was called without gradients while {self.fed} mini-batch(es) of an asynchronous "
                "pipeline are in flight; call it for evaluation outside training_step (validation drains the "
                "pipeline first)"
            )
        return super().__call__(x, step, loss_fn)

    def _check_same_input(self, x: Tensor) -> None:
        # A collective: only where the pipeline (re)fills, so the steps between stay free of synchronisation.
        if self.fed == 0:
            super()._check_same_input(x)

    def _train(self, x: Tensor, step: int | None, loss_fn: LossFn | None) -> Tensor:
        anchor = torch.empty(0, requires_grad=True)
        out: Tensor = _AsyncFunction.apply(self, anchor, x, step)
        return out

    def run_slot(self, x: Tensor, step_index: int | None) -> tuple[Tensor, _FreshGradients]:
        """Feed ``x``: this rank's actions of the step up to the user's loss; its output on this rank."""
        if self._pending is not None:
            raise CMPConfigError(
                f"mini-batch {self._pending[0]} of the asynchronous pipeline got no backward: its training_step "
                "returned no loss (or Lightning skipped its backward). Asynchronous schedules need a loss every "
                "step; skip samples in the DataLoader instead"
            )
        self.comm.wait_sends()  # the previous step's messages
        slot = self.fed
        if slot == 0:
            self._state = Step(training=True, inputs={})
            for weights in self.weights:
                weights.versions.clear()
        self.fed += 1
        state = self._state
        assert state is not None
        state.seed_key = self.seeds.key(step_index, True)
        state.inputs[(0, slot)] = x
        actions = slot_actions(self.num_stages, self.comm.me, slot)
        loss = next((i for i, a in enumerate(actions) if a.kind is Kind.LOSS), len(actions))
        with _FreshGradients(self.local_parameters(), keep_fresh=True) as fresh:
            self.executor.run(actions[:loss], state, wait_sends=False)
        state.inputs.pop((0, slot), None)
        if loss < len(actions):  # the last stage: its backward follows the caller's loss
            self._pending = (slot, actions[loss + 1 :])
            out = state.produced.pop((_ACT_MSG, 0, self.num_stages - 1, slot))
        else:
            out = state.outputs.pop((0, slot))
        return out.detach(), fresh

    def finish_slot(self, grad: Tensor, fresh: _FreshGradients) -> None:
        """The caller's backward: this step's gradients join the caller's; the last stage back-propagates
        ``grad``, the gradient of the caller's loss with respect to the output."""
        fresh.add_to_gradients()
        if self._pending is None:
            return
        slot, actions = self._pending
        self._pending = None
        assert self._state is not None
        self._state.output_grads[(0, slot)] = grad
        self.executor.run(actions, self._state, wait_sends=False)

    def drain(self, update: Callable[[int], None]) -> None:
        """Finish every mini-batch in flight (a collective): run the backwards this rank still owes, oldest
        first, calling ``update(batch)`` after each; gradients present before are dropped (they were applied)."""
        if self.fed == 0:
            return
        if self._pending is not None:
            raise CMPConfigError(f"mini-batch {self._pending[0]} is waiting for its backward; drain after it")
        state = self._state
        assert state is not None
        for p in self.local_parameters():
            p.grad = None
        for actions in drain_actions(self.num_stages, self.comm.me, self.fed):
            self.executor.run(actions, state, wait_sends=False)
            update(next(a.microbatch for a in actions if a.kind is Kind.BACKWARD))
        self.comm.wait_sends()
        self.fed = 0
        self._state = None

    @property
    def in_flight(self) -> int:
        """Mini-batches whose forward ran on this rank and whose backward has not."""
        if self._state is None:
            return 0
        return sum(len(acts.outputs) for acts in self._state.acts.values())


class _AsyncFunction(torch.autograd.Function):
    """Connects one step of the asynchronous pipeline to the caller's graph."""

    @staticmethod
    def forward(ctx: Any, pipeline: AsyncPipeline, anchor: Tensor, x: Tensor, step_index: int | None) -> Tensor:
        ctx.pipeline = pipeline
        out, ctx.fresh = pipeline.run_slot(x, step_index)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, None]:
        ctx.pipeline.finish_slot(grad, ctx.fresh)
        ctx.fresh = None
        return None, None, None, None
