"""Models larger than one worker: built in ``configure_model``, each worker holds only its stages at every point."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_cmp.partition.materialize import materialize
from lightning_cmp.runtime.memory import worker_bytes
from tests.helpers.lit import loader
from tests.helpers.python import run_python
from tests.helpers.scenario_large import LitLarge
from tests.strategy.test_trainer import assert_states_close

K = 4


@functools.cache
def _single_device(epochs: int) -> tuple[LitLarge, int]:
    """The same model materialised whole in one process (same seeded init), trained on one device."""
    model = LitLarge()
    with torch.device("meta"):
        model.configure_model()
    materialize(model, "cpu", seed=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader())
    return model, worker_bytes([model], [trainer.optimizers[0]]).state


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("large")
    run_python("-m", "tests.helpers.scenario_large", json.dumps({"out": str(out), "devices": K}), timeout=400)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(K)]


def test_each_worker_holds_its_share_at_every_point(ranks: list[dict]) -> None:
    _, whole = _single_device(1)  # parameters + gradients + momentum of the whole model after a step
    limit = 1.1 * (2 / K) * whole
    for r, rank in enumerate(ranks):
        points = [m["point"] for m in rank["memory"]]
        assert points[:2] == ["setup", "built"] and "checkpoint" in points and points[-1] == "teardown", points
        for m in rank["memory"]:
            if r == 0 and m["point"] == "teardown":  # default: the module is whole on rank 0 after fit
                assert m["parameters"] == whole // 3, m
                continue
            assert m["state"] <= limit, f"rank {r} at {m['point']}: {m['state']} bytes > {limit:.0f} ({m})"
        steps = [m for m in rank["memory"] if m["point"].startswith("step")]
        assert steps and all(m["gradients"] > 0 and m["optimizer"] > 0 for m in steps)
        checkpoint = next(m for m in rank["memory"] if m["point"] == "checkpoint")
        # Only rank 0 assembles the file (the stages it lacks); the others send theirs and hold nothing more
        # (a few bytes of Lightning's own loop and callback state).
        if r == 0:
            assert checkpoint["checkpoint_extra"] >= whole // 3 - checkpoint["parameters"], checkpoint
        else:
            assert checkpoint["checkpoint_extra"] < 1024, checkpoint


def test_trains_like_one_device_and_resumes(ranks: list[dict]) -> None:
    ref1, _ = _single_device(1)
    ref2, _ = _single_device(2)
    for r, rank in enumerate(ranks):
        assert_states_close(rank["state"], ref1.state_dict(), rank=r)
        assert_states_close(rank["resumed_state"], ref2.state_dict(), rank=r)
        assert (r > 0) == any(t.is_meta for t in rank["state"].values())
        # keep_split=True: no rank, not even rank 0, assembles the model after fit
        assert_states_close(rank["split_state"], ref1.state_dict(), rank=max(r, 1))
        assert any(t.is_meta for t in rank["split_state"].values())


@pytest.mark.parametrize("run", ["ckpt", "split"])
def test_checkpoint_loads_with_plain_lightning(
    ranks: list[dict], tmp_path_factory: pytest.TempPathFactory, run: str
) -> None:
    """Gathered on rank 0 (default) or written stage by stage (keep_split=True): one standard file either way."""
    ckpt = next(Path(tmp_path_factory.getbasetemp()).glob(f"large*/{run}/last.ckpt"))
    ref = _single_device(1)[0]
    loaded = LitLarge.load_from_checkpoint(ckpt)
    assert_states_close(loaded.state_dict(), ref.state_dict())
    momentum = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["state"]
    params = list(ref.parameters())
    assert sorted(momentum) == list(range(len(params)))
    assert all(momentum[i]["momentum_buffer"].shape == p.shape for i, p in enumerate(params))


def test_stage_by_stage_checkpoint_assembles_nothing(ranks: list[dict]) -> None:
    """keep_split=True: even rank 0 holds only its stages while it writes the checkpoint."""
    _, whole = _single_device(1)
    for r, rank in enumerate(ranks):
        checkpoint = next(m for m in rank["split_memory"] if m["point"] == "checkpoint")
        assert checkpoint["state"] <= 1.1 * (2 / K) * whole and checkpoint["checkpoint_extra"] < 1024, (r, checkpoint)


def test_init_module_empty_init_and_configure_model_build_on_meta() -> None:
    """``Trainer.init_module(empty_init=True)`` and ``configure_model`` (Lightning enters both contexts) allocate
    nothing; ``empty_init=False`` keeps Lightning's default (real tensors)."""
    from torch import nn

    import lightning_cmp

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cmp", logger=False)
    with trainer.init_module(empty_init=True):
        assert nn.Linear(2, 2).weight.is_meta
    with trainer.init_module(empty_init=False):
        assert not nn.Linear(2, 2).weight.is_meta
    strategy = trainer.strategy
    assert isinstance(strategy, lightning_cmp.CMPStrategy)
    with strategy.tensor_init_context(), strategy.model_sharded_context():
        assert nn.Linear(2, 2).weight.is_meta
