"""Micro-batched ``cmp`` (both directions interleaved 1F1B-style) through the Trainer at K=3, one launch, several fits.

Each microbatch's loss comes from the user's unchanged ``training_step`` run on that microbatch; the weights,
what is logged and the torchmetrics value equal one device's, on every rank; a loss that mixes samples is
refused on every rank, and a model input that differs between the calls on the ranks that make them.
"""

from __future__ import annotations

import functools

import pytest

from tests.helpers.python import run_scenario
from tests.helpers.scenario_microbatch import FITS, MODULES, STEPS, LitMicro, fit
from tests.strategy.test_trainer import assert_states_close

K = 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_scenario("tests.helpers.scenario_microbatch", tmp_path_factory.mktemp("microbatch"), K)


@functools.cache
def _single_device(name: str) -> dict:
    _, trainer_kw, fp16 = FITS[name]
    module = LitMicro(**MODULES.get(name, {}))
    trainer, recorder = fit(1, module, None, fp16, **trainer_kw)
    scale = float(trainer.precision_plugin.scaler.get_scale()) if fp16 else None  # type: ignore[attr-defined]
    return {"state": module.state_dict(), "logged": recorder.logged, "scale": scale}


# n4_accumulate: Lightning divides the loss by accumulate_grad_batches; n2_sum: a summed loss (microbatches of 3);
# bip_*: Bi-Partition (separate forward and backward cuts) with every schedule
@pytest.mark.parametrize(
    "name",
    ["n2", "n4_accumulate", "n2_parameter", "n2_sum", "bip_mp", "bip_gpipe", "bip_cmp", "bip_cmp_n2", "bip_policy"],
)
def test_weights_and_logged_values_equal_one_device(ranks: list[dict], name: str) -> None:
    ref = _single_device(name)
    for r, rank in enumerate(ranks):
        got = rank[name]
        assert_states_close(got["state"], ref["state"], rel=1e-5, rank=r)
        assert len(got["logged"]) == len(ref["logged"]) == STEPS, f"rank {r}"
        for step, (mine, theirs) in enumerate(zip(got["logged"], ref["logged"], strict=True)):
            assert mine.keys() == theirs.keys(), f"rank {r} step {step}"
            # the whole batch's loss and the epoch's accuracy: from the ordinary call on every rank alike
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6), f"rank {r} step {step}"


def test_bipartition_runs_the_cuts_asked_for(ranks: list[dict]) -> None:
    for r, rank in enumerate(ranks):
        for name in ("bip_mp", "bip_gpipe", "bip_cmp", "bip_cmp_n2"):
            assert rank[name]["cuts"] == ([3, 5], [2, 4]), f"rank {r} {name}"
        forward, backward = rank["bip_policy"]["cuts"]  # measured: any valid pair, the same on every rank
        assert all(f >= b for f, b in zip(forward, backward, strict=True)), (forward, backward)
        assert rank["bip_policy"]["cuts"] == ranks[0]["bip_policy"]["cuts"]


def test_the_last_stages_ranks_run_training_step_once_more_per_microbatch(ranks: list[dict]) -> None:
    # rank 2 holds replica A's last stage and rank 0 replica B's: N quiet calls per batch each, rank 1 none
    calls = [rank["n2"]["steps"] for rank in ranks]
    assert calls == [STEPS * 3, STEPS, STEPS * 3]


def test_fp16_loss_scaling_applies_to_the_microbatch_losses(ranks: list[dict]) -> None:
    ref = _single_device("n2_fp16")
    for r, rank in enumerate(ranks):
        assert rank["n2_fp16"]["scale"] == ref["scale"], f"rank {r}"
        assert_states_close(rank["n2_fp16"]["state"], ref["state"], rel=2e-2, rank=r)


def test_a_loss_that_mixes_samples_is_refused_on_every_rank(ranks: list[dict]) -> None:
    for r, rank in enumerate(ranks):
        error = rank["mix"]["error"]
        assert error is not None and error.startswith("MicrobatchLossMismatch"), f"rank {r}: {error}"
        assert "mixes samples" in error and "num_microbatches=1" in error, error


def test_a_random_input_in_training_step_is_refused(ranks: list[dict]) -> None:
    # only the last stages' ranks run the microbatch calls; the others see the failure as a lost peer
    errors = [rank["noise"]["error"] for rank in ranks]
    assert all(e is not None for e in errors), errors
    for r in (0, 2):
        assert errors[r].startswith("CMPConfigError") and "without randomness" in errors[r], errors[r]
