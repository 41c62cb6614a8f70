"""Corners of a user's module under ``strategy="cmp"`` at K=3 (one launch, several fits): each against one device.

- 16-mixed: a step whose gradients overflow in stage 0 only is skipped on every worker, and every worker's loss
  scaler moves alike (rank 1 holds stage 1 only and sees no inf itself).
- Parameters that get no gradient (a layer a block never calls) are not moved by momentum or weight decay.
- A loader built with ``shuffle=False`` keeps its order.
- A ``training_step`` that reads parameters a worker does not hold is refused with an error that says what to do.
- A copy changed outside the optimizer on one worker stops the run on every worker, naming the stage.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.python import run_scenario
from tests.helpers.scenario_corners import BATCH, LitCorners, data, loader, trainer_for
from tests.strategy.test_trainer import assert_states_close

K = 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_scenario("tests.helpers.scenario_corners", tmp_path_factory.mktemp("corners"), K)


@functools.cache
def _single_device(fp16: bool) -> tuple[dict, float]:
    model = LitCorners()
    trainer = trainer_for(1, fp16=fp16)
    trainer.fit(model, loader(probe=fp16))
    scale = float(trainer.precision_plugin.scaler.get_scale()) if fp16 else 1.0  # type: ignore[attr-defined]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, scale


def test_fp16_overflow_in_one_stage_skips_the_step_everywhere(ranks: list[dict]) -> None:
    ref, ref_scale = _single_device(fp16=True)
    assert ref_scale == 2.0**15  # one step skipped on one device: the scale halved once
    for r, rank in enumerate(ranks):
        assert rank["fp16"]["scale"] == ref_scale, f"rank {r}'s loss scale disagrees"
        # fp16 rounds a half batch differently from a whole one: close, where a step taken by mistake is not
        assert_states_close(rank["fp16"]["state"], ref, rel=2e-2, rank=r)


def test_parameters_without_gradients_stay_put(ranks: list[dict]) -> None:
    ref, _ = _single_device(fp16=False)
    initial = LitCorners().state_dict()
    for r, rank in enumerate(ranks):
        state = rank["fp32"]["state"]
        for name in (n for n in initial if ".unused." in n and not state[n].is_meta):
            assert torch.equal(state[name], initial[name]), f"rank {r}: {name} moved without a gradient"
        assert_states_close(state, ref, rank=r)


def test_an_unshuffled_loader_keeps_its_order(ranks: list[dict]) -> None:
    x = data(probe=False).tensors[0]
    expected = [float(x[i * BATCH, 1]) for i in range(len(x) // BATCH)]
    for rank in ranks:
        assert rank["fp32"]["seen"] == expected


def test_reading_parameters_a_worker_does_not_hold_is_a_clear_error(ranks: list[dict]) -> None:
    for rank in ranks:
        error = rank["reads"]["error"]
        assert error is not None and error.startswith("CMPConfigError"), error
        assert "does not hold" in error and "weight_decay" in error, error




def test_a_copy_changed_outside_the_optimizer_stops_the_run(ranks: list[dict]) -> None:
    for rank in ranks:
        error = rank["drift"]["error"]
        assert error is not None and error.startswith("CopiesDriftedError: at the end of fit"), error
        assert "stage 2 (ranks 0 and 2)" in error and "'net.5.bias'" in error, error
