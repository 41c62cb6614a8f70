"""Trainer(devices=4, strategy=CMPStrategy(num_stages=2)): two data-parallel pipelines equal one device on the
union of their batches (weights, logged losses, synced validation metrics), each pipeline on its own half of
the data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.lit import LitCNN, loader, setup_in_process
from tests.helpers.python import ROOT, run_python, run_scenario
from tests.helpers.scenario import Recorder
from tests.helpers.scenario_groups import BATCH, CASES, EPOCHS

DEVICES, STAGES = 4, 2
GROUPS = DEVICES // STAGES


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_scenario("tests.helpers.scenario_groups", tmp_path_factory.mktemp("groups"), DEVICES, timeout=500)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The same cases on two "nodes" of 2 workers each, on loopback: two ``torchrun --nnodes 2`` launches, as a user
    starts one per node (SLURM's srun starts the same processes with its own variables)."""
    out = tmp_path_factory.mktemp("nodes")
    cfg = json.dumps({"out": str(out), "devices": 2, "num_nodes": 2})
    port = _free_port()
    procs = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2"]
        command += [f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        procs.append(
            subprocess.Popen(
                [*command, "-m", "tests.helpers.scenario_groups", cfg],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [proc.communicate(timeout=500)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(DEVICES)]


@pytest.fixture(scope="module")
def reference() -> tuple[dict, list[float], dict]:
    model, recorder = LitCNN(), Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, loader(batch_size=BATCH), loader(batch_size=BATCH, seed=2))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return model.state_dict(), recorder.logged, metrics


@pytest.mark.parametrize("case", [f"{s}/{a}" for s, a in CASES])
def test_pipelines_train_like_one_device_on_the_global_batch(ranks: list[dict], reference: tuple, case: str) -> None:
    _check_case(ranks, reference, case)


def test_sharded_checkpoint_resumes_with_another_number_of_pipelines(
    ranks: list[dict], reference: tuple, tmp_path: Path
) -> None:
    # epoch 1 on 2 pipelines of 2 workers with sharded optimizer state, epoch 2 on 1 pipeline (same global batch)
    saved = Path(ranks[0]["cmp/sharded"]["checkpoints"]) / "epoch=0.ckpt"
    cfg = {"out": str(tmp_path), "devices": STAGES, "resume": str(saved)}
    cfg["cases"] = [["cmp", "sharded"]]
    run_python("-m", "tests.helpers.scenario_groups", json.dumps(cfg), timeout=300)
    ref_state = reference[0]
    for rank in range(STAGES):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["cmp/sharded"]["state"]
        for name, ref in ref_state.items():
            err = ((got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            assert err < 1e-5, f"rank {rank} {name}: relative error {err:.2e}"


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_device(two_nodes: list[dict], reference: tuple) -> None:
    for case in (f"{s}/{a}" for s, a in CASES):
        _check_case(two_nodes, reference, case)


def _check_case(ranks: list[dict], reference: tuple, case: str) -> None:
    ref_state, ref_logged, ref_metrics = reference
    for rank, per_rank in enumerate(ranks):
        got = per_rank[case]
        label = f"{case} rank {rank}"
        for name, ref in ref_state.items():
            if got["state"][name].is_meta:
                assert rank % STAGES > 0 and "sharded_dp" not in case, f"{label}: {name} missing after fit"
                continue
            err = ((got["state"][name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            assert err < 1e-5, f"{label} {name}: relative error {err:.2e}"
        # sync_dist=True averages the pipelines' losses: the global batch's loss, on every rank
        assert got["logged"] == pytest.approx(ref_logged, rel=1e-5), label
        for key in ("val_loss", "val_acc"):
            assert got["metrics"][key] == pytest.approx(ref_metrics[key], rel=1e-5), f"{label} {key}"
        # reduce_fx="sum" sums over the pipelines, as ddp sums over its ranks (and not over a pipeline's workers)
        expected_sum = (DEVICES if "sharded_dp" in case else GROUPS) * ref_metrics["train_loss_sum"]
        assert got["metrics"]["train_loss_sum"] == pytest.approx(expected_sum, rel=1e-5), label


def test_each_pipeline_trains_on_its_own_share_of_the_data(ranks: list[dict]) -> None:
    case = f"{CASES[0][0]}/{CASES[0][1]}"
    rows = [per_rank[case]["rows"] for per_rank in ranks]
    for group in range(GROUPS):
        members = rows[group * STAGES : (group + 1) * STAGES]
        assert all(r == members[0] for r in members), "every worker of one pipeline sees the same batches"
    first, second = set(rows[0]), set(rows[STAGES])
    assert not first & second, "the pipelines' shares overlap"
    everything = loader(batch_size=BATCH).dataset.tensors[0][:, 0, 0, 0].tolist()  # type: ignore[attr-defined]
    assert first | second == set(everything)


def test_asynchronous_schedules_refuse_several_pipelines() -> None:
    import lightning_cmp

    with pytest.raises(lightning_cmp.CMPConfigError, match=r"asynchronous pipelines run as one pipeline only"):
        L.Trainer(
            accelerator="cpu",
            devices=4,
            strategy=lightning_cmp.CMPStrategy(num_stages=2, schedule="spectrain"),
            logger=False,
        )


def _setup(trainer_kwargs: dict, **strategy_kwargs: object) -> None:
    import lightning_cmp

    setup_in_process(LitCNN(), lightning_cmp.CMPStrategy(**strategy_kwargs), **trainer_kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("strategy_kwargs", "trainer_kwargs", "message"),
    [
        ({}, {"gradient_clip_val": 1.0}, r"gradient_clip_val=1.0: no worker holds a whole gradient"),
        ({"keep_split": True}, {}, r"keep_split=True: checkpoints gather the shards"),
        ({"partition": "bipartition"}, {}, r"partition='bipartition': use 'balanced'"),
        (
            {"num_microbatches": 2},
            {},
            r"num_microbatches=2 with schedule='cmp'.*use num_microbatches=1 or schedule='gpipe'",
        ),
    ],
)
def test_sharded_refuses_what_it_cannot_do_yet(strategy_kwargs: dict, trainer_kwargs: dict, message: str) -> None:
    import lightning_cmp

    with pytest.raises(lightning_cmp.CMPConfigError, match=r"averaging='sharded' cannot run with .*" + message):
        _setup(averaging="sharded", trainer_kwargs=trainer_kwargs, **strategy_kwargs)


def test_sharded_needs_more_than_one_copy_of_each_stage() -> None:
    import lightning_cmp

    with pytest.raises(lightning_cmp.CMPConfigError, match=r"strategy='mp' on 2 workers .* has one copy of each"):
        L.Trainer(accelerator="cpu", devices=2, strategy=lightning_cmp.CMPStrategy(schedule="mp", averaging="sharded"))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="sharded_dp", logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, lightning_cmp.CMPStrategy)
    assert (strategy.num_stages, strategy.num_groups, strategy.averaging) == (1, 2, "sharded")
