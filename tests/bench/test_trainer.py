"""The Trainer-level timing harness: one short run each of ``cmp`` and ``ddp`` on the tiny model (each step's time
and its parts, which add up to it), and the summary of repeated runs (in process)."""

from __future__ import annotations

import pytest

from lightning_cmp.bench.trainer import METHODS, PARTS, run_trainer, summarize_trainer


@pytest.mark.timeout(150)
def test_cmp_and_ddp_runs_time_each_step_and_split_it_into_parts() -> None:
    for method in ("cmp", "ddp"):
        run = run_trainer(method, "tiny", batch_size=16, size=16, steps=2, timeout=60)
        assert len(run["step_s"]) == 2 and set(run["parts"]) == set(PARTS)
        for i, step in enumerate(run["step_s"]):
            parts = [run["parts"][p][i] for p in PARTS]
            assert step > 0 and all(p >= 0 for p in parts), (method, step, parts)
            assert sum(parts) == pytest.approx(step, rel=0.01, abs=0.002), (method, step, parts)
        assert all(s > 0 for s in run["parts"]["training_step"] + run["parts"]["backward"]), (method, run)


def test_summary_takes_medians_over_steps_then_repeats() -> None:
    def run(step_s: list[float], backward: float) -> dict:
        parts = {p: [0.0] * len(step_s) for p in PARTS} | {"backward": [backward] * len(step_s)}
        return {"step_s": step_s, "parts": parts}

    row = summarize_trainer([run([0.1, 0.5, 0.4], 0.2), run([0.2], 0.1), run([0.25, 0.75], 0.3)], batch_size=8)
    assert row["step_s_repeats"] == [0.4, 0.2, 0.5]
    assert row["step_s"] == 0.4 and row["step_s_spread"] == [0.2, 0.5]
    assert row["samples_per_s"] == 20.0 and row["samples_per_s_spread"] == [16.0, 40.0]
    assert row["samples_per_s_repeats"] == [20.0, 40.0, 16.0]
    assert row["parts"] == {"training_step": 0.0, "backward": 0.2, "optimizer": 0.0, "other": 0.0}


def test_methods_split_the_same_global_batch_and_misses_are_explained() -> None:
    assert {n: m.per_loader(16) for n, m in METHODS.items() if n in ("single", "ddp", "mp", "cmp", "ddp4")} == {
        "single": 16, "ddp": 8, "mp": 16, "cmp": 16, "ddp4": 4,
    }  # fmt: skip
    assert dict(METHODS["cmp_gloo"].env) == {"LIGHTNING_CMP_SHM": "0"} and METHODS["single_2threads"].threads == 2
    with pytest.raises(ValueError, match="unknown Trainer method 'dpp'; use one of single, "):
        run_trainer("dpp", "tiny", 16, 16, 2)
    with pytest.raises(ValueError, match=r"unknown option.* bucket_mb; run_trainer takes bucket_cap_mb"):
        run_trainer("ddp", "tiny", 16, 16, 2, bucket_mb=4)
    with pytest.raises(ValueError, match=r"batch_size=6 does not split over ddp4's 4 .* use a multiple of 4"):
        run_trainer("ddp4", "tiny", 6, 16, 2)
