"""Asynchronous pipelines (spectrain, pipedream, async) against a single-process replay of the same schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_cmp.partition import trace_chain, uniform_cuts
from lightning_cmp.runtime import Comm, OptimizerLayout
from lightning_cmp.runtime.asynchronous import AsyncPipeline
from tests.helpers.async_reference import replay
from tests.helpers.launch import run_workers
from tests.helpers.models import batches, build

STEPS = 6
LR, MOMENTUM = 0.05, 0.9
SCHEDULES = {"async": "current", "pipedream": "stash", "spectrain": "predict"}
CASES = [("sequential", name) for name in SCHEDULES]


def _train(rank: int, world: int, model_name: str, schedule: str) -> dict:
    model = build(model_name)
    chain = trace_chain(model)
    comm = Comm(list(range(world)), rank, torch.device("cpu"))
    pipe = AsyncPipeline(chain, uniform_cuts(chain.num_blocks, world), schedule, comm)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    pipe.attach_optimizer(opt)
    losses: list[float] = []
    in_flight, stashed = [], []
    for x, y in batches(STEPS):
        loss = F.cross_entropy(pipe(x), y)  # every rank: this mini-batch's own output and labels
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        in_flight.append(pipe.in_flight)
        stashed.append(pipe.weight_copy_bytes())
    peak = pipe.weight_copy_bytes(peak=True)
    drained: list[int] = []
    pipe.drain(lambda batch: (drained.append(batch), opt.step(), opt.zero_grad()))
    versions = {(w.stage, b, which): (v.base, v.ahead) for w in pipe.weights for (b, which), v in w.versions.items()}
    state = pipe.full_state_dict(dst=None)
    pipe.close()
    return {
        "state": state,
        "losses": losses,
        "versions": versions,
        "in_flight": in_flight,
        "drained": drained,
        "stashed": stashed,
        "peak": peak,
        "stage_bytes": sum(p.numel() * p.element_size() for p in pipe.local_parameters()),
    }


def _all_cases(rank: int, world: int) -> list[dict]:
    return [_train(rank, world, *case) for case in CASES]


def _reference(model_name: str, schedule: str, world: int) -> tuple[dict, list[float], dict]:
    model = build(model_name)
    chain = trace_chain(model)
    bounds = [0, *uniform_cuts(chain.num_blocks, world), chain.num_blocks]
    stages = [chain.stage_module(bounds[s], bounds[s + 1]) for s in range(world)]
    weights, losses, log = replay(stages, batches(STEPS), SCHEDULES[schedule], LR, MOMENTUM)
    state = dict(model.state_dict())
    prefix_of = {}
    for s, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            prefix_of[id(p)] = (s, name)
    for name, p in model.named_parameters():
        s, local = prefix_of[id(p)]
        state[name] = weights[s][local]
    return state, losses, log


@pytest.mark.parametrize("world", [2, 3])
def test_asynchronous_schedules_equal_their_replay(world: int) -> None:
    results = run_workers(_all_cases, world, timeout=240)
    for index, (model_name, schedule) in enumerate(CASES):
        ref_state, ref_losses, ref_log = _reference(model_name, schedule, world)
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            label = f"{model_name}/{schedule} K={world} rank {rank}"
            for name, ref in ref_state.items():
                err = ((got["state"][name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                assert err < 1e-5, f"{label}: {name} differs by {err:.2e}"
            assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), label
            mine = {key: v for key, v in ref_log.items() if key[0] == rank}
            assert got["versions"] == mine, label
            # stage k holds at most K - k mini-batches; the drain runs the K - k - 1 backwards still owed
            assert max(got["in_flight"]) == world - rank - 1, label
            assert got["drained"] == list(range(STEPS - (world - rank - 1), STEPS)), label
            # weight copies held at once: PipeDream one per mini-batch in flight, SpecTrain one scratch (none where
            # it predicts nothing: the last stage at K=2), async none
            copies = {"pipedream": world - rank, "spectrain": int((world, rank) != (2, 1)), "async": 0}[schedule]
            assert got["peak"] == copies * got["stage_bytes"], label


def test_the_replay_uses_the_versions_worked_out_by_hand() -> None:
    # 2 stages, 3 mini-batches: stage 0 runs F0, F1 B0, F2 B1, then B2 in the drain; stage 1 F_j B_j in step j
    torch.manual_seed(0)
    stages = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)]
    data = [(torch.randn(2, 4), torch.tensor([0, 2])) for _ in range(3)]
    expected = {
        "current": {(0, 0): (0, 0), (0, 1): (0, 1), (0, 2): (1, 2), (1, 0): (0, 0), (1, 1): (1, 1), (1, 2): (2, 2)},
        "stash": {(0, 0): (0, 0), (0, 1): (0, 0), (0, 2): (1, 1), (1, 0): (0, 0), (1, 1): (1, 1), (1, 2): (2, 2)},
    }
    for policy, versions in expected.items():
        _, _, log = replay(stages, data, policy, LR, MOMENTUM)
        got = {(k, j): (log[(k, j, "forward")][0], log[(k, j, "backward")][0]) for k in range(2) for j in range(3)}
        assert got == versions, policy
    _, _, log = replay(stages, data, "predict", LR, MOMENTUM)
    # SpecTrain at K=2: stage 0 predicts 1 update ahead in the forward, none in the backward; stage 1 none
    assert [log[(0, j, "forward")] for j in range(3)] == [(0, 1), (0, 1), (1, 1)]
    assert [log[(0, j, "backward")] for j in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert {log[(1, j, p)][1] for j in range(3) for p in ("forward", "backward")} == {0}


def test_the_replay_differs_between_policies() -> None:
    # the comparison above can fail: the three policies train to different weights on these batches
    states = {p: _reference("sequential", p, 2)[0] for p in SCHEDULES}
    for a, b in [("async", "pipedream"), ("async", "spectrain"), ("pipedream", "spectrain")]:
        diff = max(((states[a][n] - states[b][n]).abs().max() / states[a][n].abs().max()).item() for n in states[a])
        assert diff > 1e-4, (a, b, diff)
