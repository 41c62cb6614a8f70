"""End to end: Trainer(strategy=CMPStrategy(...)) on 2-3 CPU workers equals single-device Lightning training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.lit import LitCNN, loader
from tests.helpers.python import run_python


def launch(tmp_path: Path, timeout: float = 300, **cfg: object) -> list[dict]:
    """Run the scenario script like a user would; Lightning starts the other workers itself."""
    cfg["out"] = str(tmp_path)
    run_python("-m", "tests.helpers.scenario", json.dumps(cfg), timeout=timeout)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(int(cfg["devices"]))]  # type: ignore[call-overload]


def single_device(epochs: int, **trainer_kwargs: object) -> tuple[LitCNN, L.Trainer, list[float]]:
    model = LitCNN()
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(model, loader(), loader(seed=2))
    return model, trainer, losses


def assert_states_close(got: dict, ref: dict, rel: float = 1e-5, rank: int = 0) -> None:
    """After fit rank 0 holds the whole model; another rank holds its own stages (the rest is on the meta device)."""
    assert set(got) == set(ref)
    for k in ref:
        if got[k].is_meta:
            assert rank > 0, f"{k}: rank 0 must hold the whole model after fit"
            continue
        err = ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item()
        assert err < rel, f"{k}: relative error {err:.2e}"


def test_cmp_fit_validate_test_predict_checkpoint_resume(tmp_path: Path) -> None:
    ranks = launch(tmp_path, devices=2, epochs=2, evaluate=True, resume_epochs=3)
    ref_model, ref_trainer, ref_losses = single_device(2)

    for rank in ranks:
        # what training_step returned and what the progress bar / loggers saw, on every rank
        assert rank["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert rank["logged"] == pytest.approx(ref_losses, rel=1e-5)
        # after fit the user's module holds the whole trained model on rank 0 (K=2 cmp: on both ranks)
        assert_states_close(rank["state"], ref_model.state_dict())
        # sum-reduced logs are not multiplied by the number of workers
        assert rank["metrics"]["train_loss_sum"] == pytest.approx(
            float(ref_trainer.callback_metrics["train_loss_sum"]), rel=1e-5
        )
        assert rank["metrics"]["val_loss"] == pytest.approx(float(ref_trainer.callback_metrics["val_loss"]), rel=1e-5)
        assert rank["metrics"]["val_acc"] == pytest.approx(float(ref_trainer.callback_metrics["val_acc"]))

    ref_val = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    expected_val = ref_val.validate(ref_model, loader(seed=2), verbose=False)
    expected_test = ref_val.test(ref_model, loader(seed=3), verbose=False)
    expected_pred = torch.cat(ref_val.predict(ref_model, loader(seed=3)))  # type: ignore[arg-type]
    for rank in ranks:
        assert rank["validate"][0]["val_loss"] == pytest.approx(expected_val[0]["val_loss"], rel=1e-5)
        assert rank["test"][0]["test_acc"] == pytest.approx(expected_test[0]["test_acc"])
        assert torch.allclose(rank["predict"], expected_pred, rtol=1e-5, atol=1e-6)
        assert_states_close(rank["state_after_eval"], ref_model.state_dict())

    # The checkpoint is one standard file that loads without lightning_cmp, keyed like the unsplit model.
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(ref_model.state_dict())
    loaded = LitCNN.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert_states_close(loaded.state_dict(), ref_model.state_dict())
    # Optimizer state in the unsplit layout: one momentum buffer per parameter, in parameter order.
    momentum = ckpt["optimizer_states"][0]["state"]
    params = list(ref_model.parameters())
    assert sorted(momentum) == list(range(len(params)))
    for index, p in enumerate(params):
        assert momentum[index]["momentum_buffer"].shape == p.shape

    # Resuming from last.ckpt for a third epoch reaches the weights of three uninterrupted epochs.
    ref3, _, _ = single_device(3)
    for rank in ranks:
        assert_states_close(rank["resumed_state"], ref3.state_dict())


def test_gpipe_equals_single_device_and_writes_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "run.json"
    ranks = launch(tmp_path, devices=2, epochs=1, schedule="gpipe", trace=str(trace))
    ref_model, _, ref_losses = single_device(1)
    for r, rank in enumerate(ranks):
        assert rank["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert_states_close(rank["state"], ref_model.state_dict(), rank=r)
    # one replica: rank 1 holds only the second stage after fit
    assert any(t.is_meta for t in ranks[1]["state"].values())
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == {0, 1}
    assert {e["cat"] for e in events} >= {"forward", "backward", "communication", "wait"}
    # four microbatches (GPipe's default) of each stage forward per training step
    assert any(e["name"] == "F.A1.m3" for e in events if e["pid"] == 1)


@pytest.mark.parametrize(
    ("devices", "schedule", "averaging"),
    [(3, "cmp", "gradient"), (2, "mp", "gradient"), (2, "cmp", "parameter")],
)
def test_other_placements_equal_single_device(tmp_path: Path, devices: int, schedule: str, averaging: str) -> None:
    ranks = launch(tmp_path, devices=devices, epochs=1, schedule=schedule, averaging=averaging)
    ref_model, _, ref_losses = single_device(1)
    for r, rank in enumerate(ranks):
        assert rank["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert_states_close(rank["state"], ref_model.state_dict(), rank=r)


def test_gradient_accumulation_and_global_norm_clipping(tmp_path: Path) -> None:
    # K=3: no worker holds the whole model, so a per-worker norm would clip differently (with K=2 cmp each
    # worker holds one copy of every stage and the local norm happens to be the global one).
    ranks = launch(tmp_path, devices=3, epochs=1, accumulate=2, clip=0.05)
    ref_model, _, _ = single_device(1, accumulate_grad_batches=2, gradient_clip_val=0.05)
    unclipped, _, _ = single_device(1, accumulate_grad_batches=2)
    for r, rank in enumerate(ranks):
        assert_states_close(rank["state"], ref_model.state_dict(), rank=r)
    # the clip was active, so this test can tell a per-worker norm from the global one
    assert any(not torch.allclose(ref_model.state_dict()[k], unclipped.state_dict()[k]) for k in ref_model.state_dict())


def test_pytorch_lightning_package(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    run_python("-m", "tests.helpers.scenario_pl", str(tmp_path))
    ref_model, _, _ = single_device(1)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["strategy"] == "lightning_cmp.pytorch_lightning"
        assert_states_close(got["state"], ref_model.state_dict(), rank=r)


def test_bf16_autocast_and_threads_per_worker(tmp_path: Path) -> None:
    """Lightning's precision plugin still wraps the stages (bf16 autocast on CPU); each worker gets its cores."""
    ranks = launch(tmp_path, devices=2, epochs=1, precision="bf16-mixed")
    _, _, ref_losses = single_device(1, precision="bf16-mixed")
    for rank in ranks:
        assert rank["threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert rank["logits_dtype"] == "torch.bfloat16"  # the stages ran under autocast
        # bf16 rounding differs between a split and an unsplit batch: close, not equal
        assert rank["losses"] == pytest.approx(ref_losses, rel=2e-2)
        assert all(torch.isfinite(v).all() for v in rank["state"].values())
