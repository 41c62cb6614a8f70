"""A NaN or Inf loss behaves as on one device (anomaly error, or NaN weights), and the replicas stay identical.

The same launch also checks two data set-ups: nested-dict batches, and ranks given different data.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.lit import loader
from tests.reliability.launch import launch
from tests.reliability.scenario import NaNAfter
from tests.strategy.test_trainer import assert_states_close, single_device

NAN_STEP = 2


def _single_device(detect_anomaly: bool, inf: bool = False) -> tuple[NaNAfter, str | None]:
    model = NaNAfter(None, NAN_STEP) if inf else NaNAfter(NAN_STEP)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        detect_anomaly=detect_anomaly,
    )
    try:
        trainer.fit(model, loader())
    except RuntimeError as err:
        return model, f"{type(err).__name__}: {err}"
    return model, None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_like_single_device(ranks: list[dict], ref: NaNAfter) -> None:
    """Every rank's weights equal the single device's (same NaN and Inf places), and each stage's two copies
    (replica A on one worker, B on the other) are bitwise identical."""
    for got in ranks:
        for name, value in ref.state_dict().items():
            assert torch.equal(got["state"][name].isnan(), value.isnan()), name
            assert torch.equal(got["state"][name].isinf(), value.isinf()), name
            assert torch.allclose(got["state"][name].nan_to_num(), value.nan_to_num(), rtol=1e-5, atol=1e-7)
    assert any(v.isnan().any() for v in ref.state_dict().values())
    copies = {key: state for got in ranks for key, state in got["copies"].items()}
    for stage in (0, 1):
        a, b = copies[f"0,{stage}"], copies[f"1,{stage}"]
        for name in a:
            assert torch.equal(_bits(a[name]), _bits(b[name])), (stage, name)


@pytest.mark.timeout(300)
def test_nan_loss_matches_single_device_and_replicas_stay_identical(tmp_path: Path) -> None:
    runs = [
        {"name": "dict", "dict_batch": True},  # the other checks of this launch
        {"name": "sampler", "same_data": False, "expect_error": True},  # one launch for both files' checks
        {"name": "nan", "nan_step": NAN_STEP},
        {"name": "nan-parameter", "nan_step": NAN_STEP, "averaging": "parameter"},
        {"name": "inf", "inf_step": NAN_STEP},
        {"name": "anomaly", "nan_step": NAN_STEP, "detect_anomaly": True},  # raises: last
    ]
    outcome = launch("tests.reliability.scenario", {"out": str(tmp_path), "devices": 2, "runs": runs})
    assert outcome.leftovers == []
    assert outcome.returncode == 1, outcome.log[-3000:]

    # Without detect_anomaly training goes on, with the same NaN weights as on one device, whether the
    # replicas sum gradients or average weights (every step), and for a loss that overflows to +inf.
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref, error = _single_device(detect_anomaly=False)
    assert error is None
    for run in ("nan", "nan-parameter"):
        _assert_like_single_device([got[run] for got in results], ref)
    ref_inf, error = _single_device(detect_anomaly=False, inf=True)
    assert error is None
    _assert_like_single_device([got["inf"] for got in results], ref_inf)

    # With detect_anomaly every worker raises torch's anomaly error, as the single device does.
    _, ref_error = _single_device(detect_anomaly=True)
    assert ref_error is not None and "returned nan values" in ref_error
    for r in range(2):
        error = json.loads((tmp_path / f"rank{r}-anomaly.json").read_text())["error"]
        assert error == ref_error

    # Nested-dict batches with non-tensor fields work when training_step unpacks them.
    ref_dict = single_device(1)[0]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["dict"]
        assert_states_close(got["state"], ref_dict.state_dict())

    # use_distributed_sampler=False with a sampler that differs per rank: refused on every rank at once.
    for r in range(2):
        error = json.loads((tmp_path / f"rank{r}-sampler.json").read_text())["error"]
        assert error.startswith("CMPConfigError: rank(s) [1] of the pipeline received a different batch than rank 0")
        assert "keep use_distributed_sampler=True" in error
