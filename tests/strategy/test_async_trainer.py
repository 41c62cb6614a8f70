"""spectrain, pipedream and async through the Trainer at K=2 (one launch, several fits), against the replay.

Every rank logs each mini-batch's own loss (its output with its own labels), the pipeline is drained at the end
of every epoch, at max_steps and before validation (N batches make N updates of every stage), an LR scheduler's
rate applies to the mini-batch of the step it was set for, and a run resumed from a checkpoint equals the
uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch

from lightning_cmp.partition import trace_chain
from tests.helpers.async_reference import replay
from tests.helpers.lit import loader
from tests.helpers.models import build
from tests.helpers.python import run_scenario
from tests.helpers.scenario_async import BATCHES, FITS, LR
from tests.strategy.test_trainer import assert_states_close

K = 2
POLICY = {"spectrain": "predict", "pipedream": "stash", "async": "current"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_scenario("tests.helpers.scenario_async", tmp_path_factory.mktemp("async"), K)


def _replay(schedule: str, cuts: list[int], fills: list[int], rates: list[float]) -> tuple[dict, list[float]]:
    model = build("sequential")
    chain = trace_chain(model)
    bounds = [0, *cuts, chain.num_blocks]
    stages = [chain.stage_module(bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1)]
    data = [batch for _ in range(len(fills)) for batch in loader()]  # the same batches every epoch
    data = data[: sum(fills)]
    weights, losses, _ = replay(stages, data, POLICY[schedule], LR, 0.9, fills=fills, lrs=rates)
    where = {id(p): (s, n) for s, stage in enumerate(stages) for n, p in stage.named_parameters()}
    state = {f"net.{n}": t for n, t in model.state_dict().items()}
    for name, p in model.named_parameters():
        s, local = where[id(p)]
        state[f"net.{name}"] = weights[s][local]
    return state, losses


FILLS = {
    "spectrain": [BATCHES, BATCHES],
    "pipedream": [BATCHES, BATCHES],
    "async": [BATCHES, BATCHES],
    "max_steps": [BATCHES, 3],
    "validation": [3, BATCHES - 3],
}


@pytest.mark.parametrize("name", list(FITS))
def test_weights_and_logged_losses_equal_the_replay(ranks: list[dict], name: str) -> None:
    schedule = FITS[name][0]["schedule"]
    got0 = ranks[0][name]
    ref_state, ref_losses = _replay(schedule, got0["cuts"], FILLS[name], got0["rates"])
    assert got0["global_step"] == sum(FILLS[name])
    for r, rank in enumerate(ranks):
        got = rank[name]
        assert got["cuts"] == got0["cuts"], f"rank {r}"
        assert_states_close(got["state"], ref_state, rel=1e-5, rank=r)
        # each step logs its own mini-batch's loss, on every rank alike
        assert got["logged"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), f"rank {r} {name}"


def test_the_scheduler_rate_of_each_step_is_the_one_replayed(ranks: list[dict]) -> None:
    # StepLR halves every 2 steps and restarts nowhere: the replay applied these rates to the batches' updates
    assert ranks[0]["pipedream"]["rates"][:5] == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4])


def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_one(ranks: list[dict]) -> None:
    for r, rank in enumerate(ranks):
        got = rank["resume"]
        assert got["global_step"] == 2 * BATCHES
        for k, ref in got["uninterrupted"].items():
            if got["state"][k].is_meta or ref.is_meta:
                assert r > 0, k
                continue
            assert torch.equal(got["state"][k], ref), f"rank {r}: {k}"
