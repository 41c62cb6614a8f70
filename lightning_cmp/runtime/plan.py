"""Where to cut, decided on the first batch: the partition policies, measured, and the same on every rank."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_cmp.errors import PartitionError
from lightning_cmp.partition import (
    BlockCosts,
    Chain,
    bipartition_cuts,
    bipartition_pass_costs,
    check_bipartition_cuts,
    measured_costs,
    profile_blocks,
    resolve_cuts,
    stage_pass_costs,
)
from lightning_cmp.partition.solver import POLICIES
from lightning_cmp.runtime.comm import Comm, message_tag
from lightning_cmp.runtime.replay import profile_replay
from lightning_cmp.schedule import get_schedule

__all__ = ["PARTITIONS", "Partition", "Plan", "check_partition", "plan_partition"]

#: Partition policies by name; a list of cuts and a ``{"forward": [...], "backward": [...]}`` pair are explicit.
PARTITIONS = (*POLICIES, "bipartition")

#: What ``CMPStrategy(partition=...)`` accepts.
Partition = str | Sequence[int] | Mapping[str, Sequence[int]]

_PING_MSG = 9  # message kind of the transfer-time probe


@dataclass(frozen=True)
class Plan:
    """The cuts every rank uses: ``cuts`` (backward, owned), ``forward_cuts`` (equal without Bi-Partition) and
    each stage's (forward, backward) cost for interleaved orders (None when nothing was measured)."""

    cuts: list[int]
    forward_cuts: list[int]
    stage_costs: tuple[list[float], list[float]] | None = None
    costs: BlockCosts | None = None
    note: str = ""  # why these cuts, for the log


def check_partition(partition: Partition, chain: Chain, num_stages: int) -> None:
    """At set-up, before any batch: refuse a partition that cannot serve this chain, naming the value and the fix."""
    forbidden = chain.forbidden_cuts()
    if isinstance(partition, Mapping):
        forward, backward = _explicit_pair(partition)
        check_bipartition_cuts(forward, backward, chain.num_blocks, num_stages, forbidden, forward_ahead=True)
        return
    if partition == "bipartition":
        resolve_cuts("uniform", chain.num_blocks, num_stages, forbidden=forbidden)
        free = chain.num_blocks - len(forbidden)
        if free <= num_stages:
            raise PartitionError(
                f"partition='bipartition' with {num_stages} stages needs more than {num_stages} blocks that can be cut "
                f"(one forward cut apart from its backward cut); {chain.name} has {free}. Use partition='balanced', "
                "or pass module=... to split a deeper submodule"
            )
        return
    policy = partition if partition != "balanced" else "uniform"
    resolve_cuts(policy, chain.num_blocks, num_stages, forbidden=forbidden)


def _explicit_pair(partition: Mapping[str, Sequence[int]]) -> tuple[list[int], list[int]]:
    if set(partition) != {"forward", "backward"}:
        raise PartitionError(
            f"partition={dict(partition)!r}: an explicit Bi-Partition is a mapping with exactly the keys 'forward' and "
            "'backward', each a list of num_stages - 1 cut indices, e.g. {'forward': [6], 'backward': [5]}"
        )
    try:
        return [int(c) for c in partition["forward"]], [int(c) for c in partition["backward"]]
    except (TypeError, ValueError) as err:
        raise PartitionError(
            f"partition={dict(partition)!r}: 'forward' and 'backward' must each be a list of block indices ({err})"
        ) from err


def plan_partition(
    partition: Partition, chain: Chain, x: Tensor, comm: Comm, schedule: str = "mp", num_microbatches: int = 1
) -> Plan:
    """The cuts for ``partition`` (a collective): profiled on ``x`` by rank 0 where a policy needs costs, then
    broadcast, so every rank builds the same stages and the same schedule order.

    ``"bipartition"`` keeps its separate cuts only when ``schedule`` at ``num_microbatches``, simulated with the
    measured costs, runs a step faster with them than with layer-wise balanced cuts: evening out each worker's
    forward + backward is what a 1F1B steady state needs, but ``mp`` runs one stage at a time (the split's
    charges only add), GPipe's fill and drain wait on the slowest forward and the slowest backward separately,
    and ``cmp``'s mirrored replicas already give every worker the same work at even K.
    """
    num_stages = comm.size
    per_byte = seconds_per_byte(comm) if partition == "bipartition" else None
    plan = None
    if comm.me == 0:
        plan = _plan(partition, chain, x, num_stages, per_byte, schedule, num_microbatches)
    result: Plan = comm.broadcast_object(plan, 0)
    return result


def _plan(
    partition: Partition,
    chain: Chain,
    x: Tensor,
    num_stages: int,
    per_byte: float | None,
    schedule: str,
    num_microbatches: int,
) -> Plan:
    forbidden = chain.forbidden_cuts()
    if isinstance(partition, Mapping):
        forward, backward = _explicit_pair(partition)
        return Plan(backward, forward, note="explicit Bi-Partition")
    if partition == "bipartition":
        assert per_byte is not None
        costs = measured_costs(profile_blocks(chain, x), profile_replay(chain, x), per_byte)
        forward, backward = bipartition_cuts(costs, num_stages, forbidden, forward_ahead=True)
        both = [f + b for f, b in zip(costs.forward, costs.backward, strict=True)]
        layered = resolve_cuts("balanced", chain.num_blocks, num_stages, both, forbidden)
        spec = get_schedule(schedule)
        split, plain = bipartition_pass_costs(costs, forward, backward), bipartition_pass_costs(costs, layered, layered)
        split_s = spec.simulate(num_microbatches, split).makespan
        plain_s = spec.simulate(num_microbatches, plain).makespan
        times = f"simulated step {split_s:.4g} s with separate cuts, {plain_s:.4g} s with layer-wise balanced cuts"
        if forward != backward and split_s < plain_s:
            return Plan(backward, forward, split, costs, f"bipartition: {times}")
        return Plan(layered, layered, plain, costs, f"bipartition kept layer-wise cuts for {schedule}: {times}")
    blocks = profile_blocks(chain, x) if partition == "balanced" else None
    costs_per_block = [f + b for f, b in blocks] if blocks is not None else None
    cuts = resolve_cuts(partition, chain.num_blocks, num_stages, costs_per_block, forbidden)
    return Plan(cuts, cuts, stage_pass_costs(blocks, cuts) if blocks is not None else None)


def seconds_per_byte(comm: Comm, nbytes: int = 4 << 20, repeats: int = 3) -> float | None:
    """One-way time per byte of a message between group positions 0 and 1 (a ping-pong of ``nbytes``, median of
    ``repeats``), on position 0; None elsewhere (the others do not take part)."""
    if comm.me > 1 or comm.size < 2:
        return None
    buf = torch.zeros(nbytes // 4, device=comm.device)
    peer, tag = 1 - comm.me, message_tag(_PING_MSG, 0, 0, 0)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        if comm.me == 0:
            comm.send(buf, peer, tag)
            comm.wait_sends()
            comm.recv(peer, tag)
        else:
            comm.recv(peer, tag)
            comm.send(buf, peer, tag)
            comm.wait_sends()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) / (2 * nbytes) if comm.me == 0 else None
