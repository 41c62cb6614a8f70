"""Runs one rank's lowered action stream: a dispatch table from action kind to handler."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_cmp.errors import ScheduleError
from lightning_cmp.runtime.averaging import Averager
from lightning_cmp.runtime.comm import Comm, message_tag
from lightning_cmp.runtime.rng import SeedKey, stage_seed
from lightning_cmp.runtime.stage import StageActivations, StageCopy
from lightning_cmp.schedule import Action, Kind, Placement, render_program

__all__ = ["Executor", "Step"]

_ACT_MSG, _GRAD_MSG = 0, 1
_REC_MSG = 5  # Bi-Partition: a recording of the next stage's lead blocks, sent right after the activation
_OUT_MSG = 10  # asynchronous schedules: a mini-batch's output, sent to a rank that runs the user's loss on it

Key = tuple[int, int, int, int]  # (message, replica, stage, microbatch)


@dataclass
class Step:
    """Everything one forward/backward pass of the pipeline keeps between actions.

    ``inputs``, ``outputs`` and ``output_grads`` are keyed by (replica, microbatch); tensors in flight by
    (message, replica, stage, microbatch) of the stage that produced them. With ``seed_key`` every stage forward
    draws its random numbers from its own seed (`stage_seed`); without it, from the global stream.
    ``output_grad(key, output)`` gives a LOSS action the output gradient of (replica, microbatch) ``key``.
    """

    training: bool
    inputs: dict[tuple[int, int], Tensor]
    acts: dict[tuple[int, int], StageActivations] = field(default_factory=dict)
    arrived: dict[Key, Tensor] = field(default_factory=dict)
    produced: dict[Key, Tensor] = field(default_factory=dict)
    outputs: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    output_grads: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    seed_key: SeedKey | None = None
    output_grad: Callable[[tuple[int, int], Tensor], Tensor] | None = None
    #: Bi-Partition: recordings of a stage's lead blocks, keyed (replica, stage that ran them, microbatch)
    recordings: dict[tuple[int, int, int], list[Tensor]] = field(default_factory=dict)
    #: Bi-Partition: (receive works, peer) of the weights arriving into a (replica, stage)'s mirror this step
    mirrors_arriving: dict[tuple[int, int], tuple[list[Any], int]] = field(default_factory=dict)

    def seed(self, replica: int, stage: int, microbatch: int) -> int | None:
        return None if self.seed_key is None else stage_seed(self.seed_key, replica, stage, microbatch)


class Executor:
    """Executes actions for one rank over its stage copies; every kind has exactly one handler.

    Examples:
        >>> executor = Executor(placement, comm, copies, averager)  # doctest: +SKIP
        >>> executor.run(program_forward_part, step)  # doctest: +SKIP
    """

    def __init__(
        self, placement: Placement, comm: Comm, copies: dict[tuple[int, int], StageCopy], averager: Averager
    ) -> None:
        self.placement = placement
        self.comm = comm
        self.copies = copies
        self.averager = averager
        self.last_stage = placement.num_stages - 1
        self.timings: list[tuple[str, float, float]] | None = None  # (action, start, end) when recording
        self._handlers: dict[Kind, Callable[[Action, Step], None]] = {
            Kind.FORWARD: self._forward,
            Kind.BACKWARD: self._backward,
            Kind.SEND_ACT: self._send,
            Kind.RECV_ACT: self._recv,
            Kind.SEND_GRAD: self._send,
            Kind.RECV_GRAD: self._recv,
            Kind.LOSS: self._loss,
            Kind.OUTPUT: self._output,
            Kind.AVERAGE: self._average,
            Kind.WAIT_AVERAGE: self._wait_average,
            Kind.SEND_OUT: self._send_output,
            Kind.RECV_OUT: self._recv_output,
        }

    def run(self, actions: Sequence[Action], step: Step, wait_sends: bool = True) -> None:
        """Run ``actions`` in order, then (unless ``wait_sends`` is False) wait for this rank's outstanding sends."""
        arm_before = _arm_points(actions)
        for index, action in enumerate(actions):
            if index in arm_before:
                self.averager.arm(*arm_before[index])
            start = time.perf_counter()
            try:
                self._handlers[action.kind](action, step)
            except KeyError as err:
                grid = render_program({self.comm.me: list(actions)}, mark=(self.comm.me, index))
                raise ScheduleError(f"rank {self.comm.me} has no input for {action} (missing {err}):\n{grid}") from err
            if self.timings is not None:
                self.timings.append((str(action), start, time.perf_counter()))
        if wait_sends:
            self.comm.wait_sends()

    # Tensors in flight are keyed (message, replica, stage, microbatch) by the stage that produced them,
    # the same key the lowered SEND/RECV actions carry.
    def _forward(self, a: Action, step: Step) -> None:
        if a.stage == 0:
            x = step.inputs[(a.replica, a.microbatch)]
        else:
            x = step.arrived.pop((_ACT_MSG, a.replica, a.stage - 1, a.microbatch))
        acts = step.acts.setdefault((a.replica, a.stage), StageActivations())
        seed = step.seed(a.replica, a.stage, a.microbatch)
        stage_copy = self.copies[(a.replica, a.stage)]
        recording = None
        if step.training and stage_copy.lead is not None:
            recording = step.recordings.pop((a.replica, a.stage - 1, a.microbatch))
        out = stage_copy.forward(acts, a.microbatch, x, step.training, seed, recording)
        step.produced[(_ACT_MSG, a.replica, a.stage, a.microbatch)] = out
        if step.training and stage_copy.tail is not None:
            arriving = step.mirrors_arriving.pop((a.replica, a.stage), None)
            if arriving is not None:  # the owner's current weights, sent at the start of the step
                self.comm.wait(*arriving)
            next_seed = step.seed(a.replica, a.stage + 1, a.microbatch)
            step.recordings[(a.replica, a.stage, a.microbatch)] = stage_copy.run_tail(out, next_seed)

    def _backward(self, a: Action, step: Step) -> None:
        if a.stage == self.last_stage:
            grad = step.output_grads[(a.replica, a.microbatch)]
        else:
            grad = step.arrived.pop((_GRAD_MSG, a.replica, a.stage + 1, a.microbatch))
        grad_in = self.copies[(a.replica, a.stage)].backward(step.acts[(a.replica, a.stage)], a.microbatch, grad)
        if grad_in is not None:
            step.produced[(_GRAD_MSG, a.replica, a.stage, a.microbatch)] = grad_in

    def _send(self, a: Action, step: Step) -> None:
        key = (_ACT_MSG if a.kind is Kind.SEND_ACT else _GRAD_MSG, a.replica, a.stage, a.microbatch)
        assert a.peer is not None
        self.comm.send(step.produced.pop(key), a.peer, message_tag(*key))
        recording = step.recordings.pop(key[1:], None) if a.kind is Kind.SEND_ACT else None
        if recording is not None:
            self.comm.send_list(recording, a.peer, message_tag(_REC_MSG, a.replica, a.stage, a.microbatch))

    def _recv(self, a: Action, step: Step) -> None:
        key = (_ACT_MSG if a.kind is Kind.RECV_ACT else _GRAD_MSG, a.replica, a.stage, a.microbatch)
        assert a.peer is not None
        step.arrived[key] = self.comm.recv(a.peer, message_tag(*key))
        consumer = self.copies.get((a.replica, a.stage + 1)) if a.kind is Kind.RECV_ACT else None
        if step.training and consumer is not None and consumer.lead is not None:
            tag = message_tag(_REC_MSG, a.replica, a.stage, a.microbatch)
            step.recordings[(a.replica, a.stage, a.microbatch)] = self.comm.recv_list(a.peer, tag)

    def _loss(self, a: Action, step: Step) -> None:
        if step.output_grad is None:
            raise ScheduleError(f"{a} needs the loss of each microbatch, but this step was given no loss function")
        key = (_ACT_MSG, a.replica, a.stage, a.microbatch)
        out = step.produced[key]
        step.output_grads[(a.replica, a.microbatch)] = step.output_grad((a.replica, a.microbatch), out.detach())
        step.produced[key] = out.detach()  # OUTPUT sends it later; the graph stays with the stage's backward

    def _output(self, a: Action, step: Step) -> None:
        src = self.placement.rank(a.replica, self.last_stage)
        mine = step.produced.pop((_ACT_MSG, a.replica, self.last_stage, a.microbatch)) if src == self.comm.me else None
        step.outputs[(a.replica, a.microbatch)] = self.comm.broadcast(mine, src)

    def _send_output(self, a: Action, step: Step) -> None:
        assert a.peer is not None  # the output stays here too: the user's loss on this rank needs it
        out = step.produced[(_ACT_MSG, a.replica, a.stage, a.microbatch)]
        self.comm.send(out, a.peer, message_tag(_OUT_MSG, a.replica, a.stage, a.microbatch))

    def _recv_output(self, a: Action, step: Step) -> None:
        assert a.peer is not None
        tag = message_tag(_OUT_MSG, a.replica, a.stage, a.microbatch)
        step.outputs[(a.replica, a.microbatch)] = self.comm.recv(a.peer, tag)

    def _average(self, a: Action, step: Step) -> None:
        assert a.peer is not None
        self.averager.start_gradients(a.replica, a.stage, a.peer)

    def _wait_average(self, a: Action, step: Step) -> None:
        self.averager.wait()


def _arm_points(actions: Sequence[Action]) -> dict[int, tuple[int, int, int]]:
    """Index of each averaged copy's last BACKWARD -> (replica, stage, peer): its gradients go out from there."""
    last_backward: dict[tuple[int, int], int] = {}
    points = {}
    for index, a in enumerate(actions):
        if a.kind is Kind.BACKWARD:
            last_backward[(a.replica, a.stage)] = index
        elif a.kind is Kind.AVERAGE and a.peer is not None and (a.replica, a.stage) in last_backward:
            points[last_backward[(a.replica, a.stage)]] = (a.replica, a.stage, a.peer)
    return points
