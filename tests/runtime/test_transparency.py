"""Every schedule trains to the same weights as single-process SGD on the same batches (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_cmp.partition import trace_chain, uniform_cuts
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from tests.helpers.launch import run_workers
from tests.helpers.models import averaging_dtype, batches, build, default_dtype, train_reference, train_steps

STEPS = 5
# (model, schedule, averaging, shared_memory[, num_microbatches[, shift]]): mirrors on one host exchange through
# shared memory by default; shared_memory=False sends through gloo, the path ranks on different hosts (or GPUs)
# take. ``shift``: Bi-Partition, every forward cut ``shift`` blocks after its backward cut (`_forward_cuts`).
CASES: list[tuple] = [
    ("sequential", "mp", "gradient", True),
    ("sequential", "cmp", "gradient", True),
    ("resnet18", "mp", "gradient", True),
    ("resnet18", "cmp", "gradient", True),
    ("resnet18", "cmp", "gradient", False),
    ("resnet18_bn_eval", "cmp", "gradient", True),
    # Averaging the weights after every SGD step is linear in the gradients, so it matches too (compared in
    # float64: see averaging_dtype).
    ("sequential", "cmp", "parameter", True),
    ("sequential", "cmp", "parameter", False),
    # Microbatches: both directions interleaved 1F1B-style, the loss computed per microbatch.
    ("sequential", "cmp", "gradient", True, 2),
    ("resnet18", "cmp", "gradient", True, 4),
    ("resnet18", "cmp", "gradient", False, 2),
    ("sequential", "cmp", "parameter", True, 4),
    ("resnet18", "cmp", "parameter", False, 2),
    # Bi-Partition: the first blocks of each stage run their forward on the previous rank, which sends a
    # recording of it; BatchNorm in training mode (mp: whole batches) advances its statistics alike on both.
    ("sequential_bn", "mp", "gradient", True, 1, 2),
    ("sequential", "gpipe", "gradient", True, 4, 1),
    ("resnet18", "cmp", "gradient", True, 1, 2),
    ("sequential", "cmp", "parameter", True, 1, 1),
    ("resnet18", "cmp", "gradient", False, 2, 1),
]


def _forward_cuts(cuts: list[int], num_blocks: int, shift: int) -> list[int]:
    """Each forward cut ``shift`` blocks after its backward cut, at most at the next backward cut."""
    return [min(c + shift, stop) for c, stop in zip(cuts, [*cuts[1:], num_blocks - 1], strict=True)]


def _train(*args: object) -> dict:
    with default_dtype(averaging_dtype(str(args[4]))):
        return _train_in(*args)  # type: ignore[arg-type]


def _train_in(
    rank: int,
    world: int,
    model_name: str,
    schedule: str,
    averaging: str,
    shared_memory: bool,
    microbatches: int = 1,
    shift: int = 0,
) -> dict:
    model = build(model_name)
    chain = trace_chain(model)
    cuts = uniform_cuts(chain.num_blocks, world)
    comm = Comm(list(range(world)), rank, torch.device("cpu"))
    # Small buckets: ResNet-18's gradients go out in many pieces while its backward is still running.
    pipe = Pipeline(
        chain,
        cuts,
        schedule,
        comm,
        averaging,
        microbatches,
        bucket_bytes=256 << 10,
        shared_memory=shared_memory,
        forward_cuts=_forward_cuts(cuts, chain.num_blocks, shift),
    )
    split = sorted((c.replica, c.stage, c.lead is not None, c.tail is not None) for c in pipe.copies.values())
    uses_shared_memory = bool(pipe.executor.averager.shared_peers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    after_step = pipe.average_parameters if averaging == "parameter" else None
    losses = train_steps(pipe, opt, batches(STEPS), after_step)
    # Both copies of every stage must be bitwise identical under gradient averaging.
    mine = {(c.replica, n): t.detach().clone() for c in pipe.copies.values() for n, t in c.module.state_dict().items()}
    every = {}
    for part in pipe.comm.all_gather_object(mine):
        every.update(part)
    copies_differ = [n for (r, n), t in every.items() if r == 1 and not torch.equal(t, every[(0, n)])]
    pipe.close()
    return {
        "state": pipe.full_state_dict(dst=None),
        "losses": losses,
        "copies_differ": copies_differ,
        "shared_memory": uses_shared_memory,
        "split": split,
    }


def _cases(world: int) -> list[tuple]:
    """The cases run with ``world`` workers: the Bi-Partition ones at K = 2 and 3 (what its issue asks; K = 4
    adds minutes to CI and no new path)."""
    return [case for case in CASES if len(case) < 6 or world <= 3]


def _all_cases(rank: int, world: int) -> list[dict]:
    return [_train(rank, world, *case) for case in _cases(world)]


@pytest.fixture(scope="module")
def references() -> dict:
    out = {}
    for name, _, averaging, *_ in CASES:
        with default_dtype(averaging_dtype(averaging)):
            out[name, averaging_dtype(averaging)] = train_reference(name, STEPS)
    return out


def _relative_error(state: dict, ref: dict) -> float:
    return max(((state[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item() for k in ref)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_weights_and_losses_equal_single_process(world: int, references: dict) -> None:
    results = run_workers(_all_cases, world, timeout=240)
    for index, (model_name, schedule, averaging, shared_memory, *rest) in enumerate(_cases(world)):
        ref_state, ref_losses = references[model_name, averaging_dtype(averaging)]
        shift = rest[1] if len(rest) > 1 else 0
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            label = f"{model_name}/{schedule}/{averaging}/shm={shared_memory}/{rest} K={world} rank {rank}"
            # with a shift, every stage but the first replays its lead blocks and every one but the last runs a tail
            assert all(lead == (shift > 0 and s > 0) for _, s, lead, _ in got["split"]), label
            assert all(tail == (shift > 0 and s < world - 1) for _, s, _, tail in got["split"]), label
            assert got["shared_memory"] == (schedule == "cmp" and shared_memory), label
            assert set(got["state"]) == set(ref_state), label
            assert _relative_error(got["state"], ref_state) < 1e-5, label
            assert got["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), label
            assert got["copies_differ"] == [], label
