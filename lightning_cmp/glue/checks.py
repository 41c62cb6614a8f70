"""What `CMPStrategy` refuses before training, each refusal naming the value and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer

from lightning_cmp.errors import CMPConfigError, unknown_name
from lightning_cmp.glue.optimizers import unwrap
from lightning_cmp.runtime import AVERAGING
from lightning_cmp.runtime.plan import PARTITIONS, Partition
from lightning_cmp.schedule import get_schedule

__all__ = ["check_arguments", "check_asynchronous", "check_sharded", "check_unscaling", "check_world"]


def check_arguments(
    num_stages: int | None, schedule: str, partition: Partition, averaging: str, average_every: int
) -> None:
    """The constructor's options, each on its own.

    Examples:
        >>> check_arguments(None, "cmp", "balanced", "gradient", 1)
        >>> check_arguments(0, "cmp", "balanced", "gradient", 1)
        Traceback (most recent call last):
        ...
        lightning_cmp.errors.CMPConfigError: num_stages=0; use a whole number >= 1 (None: one stage per worker; ...
    """
    get_schedule(schedule)
    if num_stages is not None and num_stages < 1:
        raise CMPConfigError(
            f"num_stages={num_stages}; use a whole number >= 1 (None: one stage per worker; 1: the whole model on "
            "every worker, data parallelism only)"
        )
    if isinstance(partition, str) and partition not in PARTITIONS:
        raise unknown_name("partition", partition, PARTITIONS)
    if averaging not in AVERAGING:
        raise unknown_name("averaging", averaging, AVERAGING)
    if not isinstance(average_every, int) or average_every < 1:
        raise CMPConfigError(f"average_every={average_every!r}; use a whole number of steps >= 1")
    if average_every != 1 and averaging != "parameter":
        raise CMPConfigError(
            f"average_every={average_every} only applies to averaging='parameter' (averaging={averaging!r} "
            "sums gradients every step)"
        )


def check_world(devices: int, num_nodes: int, num_stages: int | None, schedule: str, averaging: str) -> int:
    """``num_stages`` for ``devices x num_nodes`` workers (``None``: one stage per worker), checked against them.

    Examples:
        >>> check_world(4, 1, None, "cmp", "gradient"), check_world(4, 1, 2, "cmp", "gradient")
        (4, 2)
        >>> check_world(3, 1, 2, "cmp", "gradient")
        Traceback (most recent call last):
        ...
        lightning_cmp.errors.CMPConfigError: num_stages=2 does not divide the Trainer's 3 workers (devices=3 x ...
    """
    world = devices * num_nodes
    if world < 2:
        raise CMPConfigError(
            f"strategy={schedule!r} splits the model over several workers but the Trainer has {world} "
            f"(devices={devices}, num_nodes={num_nodes}); use devices=2 or more"
        )
    stages = world if num_stages is None else num_stages
    if world % stages:
        fits = [k for k in range(2, world + 1) if world % k == 0]
        more = -(-world // stages) * stages
        raise CMPConfigError(
            f"num_stages={stages} does not divide the Trainer's {world} workers (devices={devices} x num_nodes="
            f"{num_nodes}): each data-parallel pipeline takes num_stages workers. Use num_stages in {fits}, or a "
            f"multiple of {stages} workers (e.g. {more})"
        )
    pipelines = world // stages
    spec = get_schedule(schedule)
    if averaging == "sharded" and pipelines == 1 and spec.num_replicas == 1:
        raise CMPConfigError(
            f"averaging='sharded' splits each stage's optimizer step over the stage's copies, but "
            f"strategy={schedule!r} on {world} workers with num_stages={stages} has one copy of each: use "
            f"schedule='cmp' (two copies), or more workers than stages (data-parallel pipelines)"
        )
    if spec.asynchronous and averaging != "gradient":
        raise CMPConfigError(
            f"strategy={schedule!r} updates each stage from its own mini-batch and has no copies to average: "
            f"remove averaging={averaging!r}"
        )
    if pipelines > 1 and spec.asynchronous:
        raise CMPConfigError(
            f"strategy={schedule!r} with {world} workers and num_stages={stages} would train {pipelines} "
            f"data-parallel pipelines; asynchronous pipelines run as one pipeline only: use num_stages={world} "
            f"(or devices={stages}), or schedule='cmp'"
        )
    return stages


def _partition_problem(partition: Partition) -> list[str]:
    if partition == "bipartition" or isinstance(partition, Mapping):
        return [f"partition={partition!r}: use 'balanced', 'uniform' or explicit cut indices"]
    return []


def check_sharded(
    schedule: str,
    partition: Partition,
    num_microbatches: int,
    gradient_clip_val: float | None,
    scaler: Any,
    keep_split: bool,
) -> None:
    """What the sharded form (each copy steps 1/n of its stage) cannot do yet, refused before training."""
    problems = []
    if gradient_clip_val:
        problems.append(
            f"gradient_clip_val={gradient_clip_val}: no worker holds a whole gradient to take the norm of; remove it "
            "or use averaging='gradient'"
        )
    if scaler is not None:
        problems.append("precision='16-mixed' (its loss scaler): use precision='bf16-mixed' or '32-true'")
    if keep_split:
        problems.append("keep_split=True: checkpoints gather the shards on rank 0; use keep_split=False")
    problems += _partition_problem(partition)
    if get_schedule(schedule).loss_per_microbatch(num_microbatches):
        problems.append(
            f"num_microbatches={num_microbatches} with schedule={schedule!r} (each microbatch's loss inside the "
            "forward): use num_microbatches=1 or schedule='gpipe'"
        )
    if problems:
        raise CMPConfigError("averaging='sharded' cannot run with " + "; ".join(problems))


def check_asynchronous(
    schedule: str,
    partition: Partition,
    num_microbatches: int,
    accumulate_grad_batches: int,
    gradient_clip_val: float | None,
    scaler: Any,
) -> None:
    """What an asynchronous schedule (stages updated one mini-batch at a time) cannot keep single-device meaning
    for, refused before training with the fix."""
    problems = []
    if num_microbatches != 1:
        problems.append(f"num_microbatches={num_microbatches}: it trains on whole mini-batches; use 1")
    problems += _partition_problem(partition)
    if accumulate_grad_batches != 1:
        problems.append(
            f"accumulate_grad_batches={accumulate_grad_batches}: each stage steps after every mini-batch's "
            "backward; use a larger batch instead"
        )
    if gradient_clip_val:
        problems.append(
            f"gradient_clip_val={gradient_clip_val}: the stages' gradients of one step belong to different "
            "mini-batches, so there is no whole-model norm to clip by; remove it or use schedule='cmp'"
        )
    if scaler is not None:
        problems.append(
            "precision='16-mixed': its loss scaler skips steps as a whole, which stages updated one by one "
            "cannot agree on; use precision='bf16-mixed' or '32-true'"
        )
    if problems:
        raise CMPConfigError(f"strategy={schedule!r} cannot run with " + "; ".join(problems))


def check_unscaling(optimizers: list[Optimizer]) -> None:
    """Optimizers that unscale inside ``step`` (fused ones) decide to skip on their own: the workers would not
    agree on an overflow in one stage."""
    for optimizer in optimizers:
        if getattr(unwrap(optimizer), "_step_supports_amp_scaling", False):
            raise CMPConfigError(
                f"{type(unwrap(optimizer)).__name__}(fused=True) unscales fp16 gradients inside its step, so the "
                "workers cannot agree on skipping a step that overflowed in one stage; build it with fused=False "
                "or use precision='bf16-mixed' (no loss scaling)"
            )
