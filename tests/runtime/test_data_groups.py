"""Data-parallel pipeline groups: D pipelines of K stages train to single-process SGD on the union of their batches."""

from __future__ import annotations

import pytest
import torch

from lightning_cmp.partition import trace_chain, uniform_cuts
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from lightning_cmp.runtime.groups import DataGroups, GroupLayout
from lightning_cmp.schedule import Placement, get_schedule
from tests.helpers.launch import run_workers
from tests.helpers.models import averaging_dtype, batches, build, default_dtype, train_steps

STEPS = 4
GROUPS = 2
# (model, schedule, averaging, num_microbatches)
CASES: list[tuple[str, str, str, int]] = [
    ("sequential", "cmp", "gradient", 1),
    ("resnet18", "cmp", "gradient", 1),
    ("sequential", "mp", "gradient", 1),
    ("resnet18", "mp", "gradient", 1),
    ("sequential", "gpipe", "gradient", 2),
    ("resnet18", "cmp", "gradient", 2),
    # Averaging every copy's weights after every SGD step is linear in the gradients: it matches too.
    ("sequential", "cmp", "parameter", 1),
    ("sequential", "mp", "parameter", 1),
    # (compared in float64: see averaging_dtype)
    # Lee et al.: reduce-scatter, each copy steps its shard, all-gather before the next forward
    ("sequential", "cmp", "sharded", 1),
    ("resnet18", "cmp", "sharded", 1),
    ("resnet18", "mp", "sharded", 1),
    ("sequential", "gpipe", "sharded", 2),
]


def _train(rank: int, world: int, model_name: str, schedule: str, averaging: str, microbatches: int) -> dict:
    with default_dtype(averaging_dtype(averaging)):
        return _train_in(rank, world, model_name, schedule, averaging, microbatches)


def _train_in(rank: int, world: int, model_name: str, schedule: str, averaging: str, microbatches: int) -> dict:
    num_stages = world // GROUPS
    model = build(model_name)
    if rank >= num_stages:  # the other pipelines start from other values: pipeline 0's must win
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    chain = trace_chain(model)
    world_comm = Comm.world(rank, torch.device("cpu"))
    data = DataGroups.build(world_comm, num_stages, Placement(num_stages, get_schedule(schedule).num_replicas))
    pipe = Pipeline(
        chain,
        uniform_cuts(chain.num_blocks, num_stages),
        schedule,
        data.pipeline,
        averaging,
        microbatches,
        bucket_bytes=64 << 10,  # many buckets: started one by one, in order, while backward runs
        data=data,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    layout = OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()})
    layout.localize(pipe)
    local = sum(p.numel() for c in pipe.copies.values() for p in c.parameters())
    after_step = {"parameter": pipe.average_parameters, "sharded": pipe.after_optimizer_step}.get(averaging)
    if averaging == "sharded":
        pipe.shard(opt, bucket_bytes=64 << 10)
    # Pipeline g takes rows [g * b, (g + 1) * b) of every global batch of GROUPS * b rows.
    mine = [(x.chunk(GROUPS)[data.group], y.chunk(GROUPS)[data.group]) for x, y in batches(STEPS)]
    losses = train_steps(pipe, opt, mine, after_step)
    pipe.check_copies("after training")
    # Lee et al.: each bucket's gather is waited for just before the first layer that uses it (forward pre-hooks);
    # only buckets first used otherwise (a parameter read directly) are waited for at the stage's start
    waited_first = (
        [] if pipe.shards is None else [(len(e.at_start), len(e.buckets)) for e in pipe.shards.copies.values()]
    )
    state_elements = sum(v.numel() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    if pipe.shards is not None:  # a checkpoint's optimizer state: whole again, keyed like the unsplit model's
        pipe.shards.unshard_state()
    optimizer_state = layout.full_state_dict(pipe, dst=0)
    if pipe.shards is not None:
        pipe.shards.drop_unsharded_state()
    pipe.close()
    return {
        "state": pipe.full_state_dict(dst=None),
        "losses": losses,
        "group": data.group,
        "state_share": state_elements / local,
        "waited_first": waited_first,  # momentum elements held per local weight
        "optimizer": optimizer_state if data.pipeline.me == 0 else None,
    }


def _all_cases(rank: int, world: int) -> list[dict]:
    cases = CASES if world == 4 else [c for c in CASES if c[0] == "sequential"]
    return [_train(rank, world, *case) for case in cases]


def _reference(name: str, dtype: torch.dtype) -> tuple[dict, list[float], dict]:
    """Single-process SGD on the global batches: weights, losses and the optimizer's state dict."""
    with default_dtype(dtype):
        model = build(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = train_steps(model, opt, batches(STEPS))
    return {k: v.clone() for k, v in model.state_dict().items()}, losses, opt.state_dict()


@pytest.fixture(scope="module")
def references() -> dict:
    dtypes = {(name, averaging_dtype(averaging)) for name, _, averaging, _ in CASES}
    return {(name, dtype): _reference(name, dtype) for name, dtype in dtypes}


@pytest.mark.parametrize("world", [4, 6])
def test_groups_equal_single_process_sgd_on_the_union_of_their_batches(world: int, references: dict) -> None:
    results = run_workers(_all_cases, world, timeout=300)
    cases = CASES if world == 4 else [c for c in CASES if c[0] == "sequential"]
    for index, case in enumerate(cases):
        ref_state, ref_losses, ref_optimizer = references[case[0], averaging_dtype(case[2])]
        per_group: dict[int, list[float]] = {}
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            label = f"{case} K={world // GROUPS} D={GROUPS} rank {rank}"
            assert got["group"] == rank // (world // GROUPS), label
            worst = max(
                ((got["state"][k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
                for k, v in ref_state.items()
            )
            assert worst < 1e-5, label
            per_group[got["group"]] = got["losses"]
            # the optimizer's state: whole on each pipeline's first rank, equal to one device's
            if got["optimizer"] is not None:
                assert sorted(got["optimizer"]["state"]) == sorted(ref_optimizer["state"]), label
                for param, ref in ref_optimizer["state"].items():
                    diff = (got["optimizer"]["state"][param]["momentum_buffer"] - ref["momentum_buffer"]).abs().max()
                    assert diff < 1e-5 * ref["momentum_buffer"].abs().max().clamp_min(1e-6), (label, param)
            # sharded: each worker keeps momentum for 1/n of its stages (n copies of each), padding aside
            copies = 2 * GROUPS if case[1] == "cmp" else GROUPS
            share = got["state_share"]
            if case[2] == "sharded":
                assert share < 1.1 / copies + 0.01, (label, share)
                # every first use here is a layer's call: nothing waits at the stage's start, each bucket at its layer
                assert all(first == 0 for first, _ in got["waited_first"]), (label, got["waited_first"])
                assert case[0] != "resnet18" or min(n for _, n in got["waited_first"]) > 1, label
            else:
                assert share >= 1.0, (label, share)
        # each pipeline's loss is the mean over its own rows; their mean is the global batch's loss
        mean = [sum(step) / GROUPS for step in zip(*per_group.values(), strict=True)]
        assert mean == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), case
        assert per_group[0] != per_group[1], case  # the pipelines really saw different rows


def test_layout_keeps_pipelines_consecutive_and_groups_every_copy_of_a_stage() -> None:
    layout = GroupLayout(num_stages=3, num_groups=2)
    assert [layout.pipeline_ranks(g) for g in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert [layout.data_ranks(p) for p in range(3)] == [[0, 3], [1, 4], [2, 5]]
    cmp, mp = Placement(3, 2), Placement(3, 1)
    # cmp: stage s lives at positions s and 2 - s; the middle stage's two copies share a rank
    assert [layout.stage_ranks(s, cmp) for s in range(3)] == [[0, 2, 3, 5], [1, 4], [0, 2, 3, 5]]
    assert [layout.stage_ranks(s, mp) for s in range(3)] == [[0, 3], [1, 4], [2, 5]]
    assert layout.copies_of_stage(1, cmp) == 4 and layout.copies_of_stage(1, mp) == 2
