"""A fast subset of ``python -m lightning_cmp.bench.torchvision_sweep`` (one worker launch, K=2): representative
torchvision models train to single-device weights or are refused at set-up, and a model that calls one Linear
twice is split by ``balanced`` where nothing is shared.

In float64: some ReLU networks amplify float32's last-bit rounding differences between two steps (in one process
too), so a float32 comparison would depend on the CPU and the thread count; float64 does not.

Also without any model: ``--merge`` keeps the rows of the models not run, the memory floor stops the workers, and
the table in docs/own-module.md is the one docs/bench/torchvision_sweep.json gives, covering every classifier.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cmp.bench import torchvision_sweep as sweep
from lightning_cmp.bench import zoo
from lightning_cmp.partition import profile_blocks, resolve_cuts, trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline
from tests.helpers.launch import run_workers

#: A residual net reusing its parameter-free ReLU, a small mobile net with squeeze-excitation, a fire-module net,
#: and one refused at set-up (its training-mode forward returns a namedtuple).
TRAINED = ["resnet18", "mobilenet_v3_small", "squeezenet1_0"]
REFUSED = {"googlenet": "googlenet.forward returns a GoogLeNetOutputs (not a tensor)"}
COMMAND = "python -m lightning_cmp.bench.torchvision_sweep"


def _shared_net() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    return nn.Sequential(nn.Flatten(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(16, 10))


def _shared_data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(zoo.STEPS)]


def _train(forward: nn.Module | Pipeline, optimizer: torch.optim.Optimizer, data: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in data:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _train_shared(rank: int, world: int) -> dict | None:
    """``balanced`` on profiled costs, as the strategy does it, then SGD through the pipeline."""
    model = _shared_net()
    chain = trace_chain(model)
    costs = [f + b for f, b in profile_blocks(chain, _shared_data()[0][0])]
    cuts = resolve_cuts("balanced", chain.num_blocks, world, costs, chain.forbidden_cuts())
    pipe = Pipeline(chain, cuts, "cmp", Comm(list(range(world)), rank, torch.device("cpu")))
    optimizer = torch.optim.SGD(model.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM)
    OptimizerLayout(optimizer, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    _train(pipe, optimizer, _shared_data())
    state = pipe.full_state_dict(dst=0)
    pipe.close()
    return None if state is None else {"cuts": cuts, "forbidden": sorted(chain.forbidden_cuts()), "state": state}


def _workers(rank: int, world: int, cases: list[dict]) -> dict:
    return {"torchvision": sweep.run_cases(rank, world, cases), "shared": _train_shared(rank, world)}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("references")
    found = []
    for name in [*TRAINED, *REFUSED]:
        size = zoo.smallest_input(name)
        reference = None
        if name in TRAINED:
            reference = str(Path(folder, f"{name}.pt"))
            torch.save(zoo.train_reference(name, size, dtype=torch.float64), reference)
        found.append({"name": name, "size": size, "reference": reference, "dtype": torch.float64})
    return found


def test_subset_matches_single_device_or_is_refused(cases: list[dict]) -> None:
    rank0, rank1 = run_workers(_workers, 2, cases=cases)
    for got, other in zip(rank0["torchvision"], rank1["torchvision"], strict=True):
        name = got["name"]
        if name in REFUSED:
            assert got["refused"].startswith(REFUSED[name]), got
            assert "aux_logits=False" in got["refused"] and other["refused"] == got["refused"]
            continue
        assert "refused" not in got, got
        assert got["blocks"] >= 2 and len(got["cuts"]) == 1, got
        assert got["max_rel_err"] < 1e-9, got
    shared = rank0["shared"]
    assert shared["forbidden"] == [2, 3]  # the Linear of blocks 1 and 3 stays in one stage
    assert len(shared["cuts"]) == 1 and shared["cuts"][0] not in (2, 3), shared
    reference = _shared_net()
    _train(reference, torch.optim.SGD(reference.parameters(), lr=zoo.LR, momentum=zoo.MOMENTUM), _shared_data())
    assert zoo.relative_error(shared["state"], reference.state_dict()) < 1e-6


def _row(model: str, result: str) -> dict:
    return {"model": model, "size": 28, "result": result, "seconds": 1.0}


def test_merge_replaces_the_rows_of_the_models_run_and_keeps_the_others(tmp_path: Path) -> None:
    out, later = tmp_path / "sweep.json", tmp_path / "later.json"
    threads = torch.get_num_threads()
    try:
        # --merge without --models runs nothing: an empty sweep with this machine's configuration
        sweep.main(["--merge", "--out", str(later)])
        record = json.loads(later.read_text())
        assert record["rows"] == [] and record["commands"] == [f"{COMMAND} --merge --out {later}"]
        earlier = {**record, "commands": ["first sweep"]}
        earlier["rows"] = [
            _row("alexnet", "matches (max rel err 1.2e-07)"),
            _row("googlenet", "refused: googlenet.forward returns a GoogLeNetOutputs (not a tensor)"),
            _row("googlenet (aux_logits=False)", "FAILED: an earlier error"),
            _row("vgg11", "cannot run here: out of memory"),
        ]
        out.write_text(json.dumps(earlier))
        record["rows"] = [_row("googlenet", "matches (max rel err 1.0e-06)"), _row("convnext_tiny", "matches")]
        later.write_text(json.dumps(record))
        sweep.main(["--merge", str(later), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    merged = json.loads(out.read_text())
    # googlenet's two earlier rows are replaced by its one new row; model_names() order
    assert [(r["model"], r["result"].split(" ")[0]) for r in merged["rows"]] == [
        ("alexnet", "matches"),
        ("convnext_tiny", "matches"),
        ("googlenet", "matches"),
        ("vgg11", "cannot"),
    ]
    assert merged["commands"] == [
        "first sweep",
        f"{COMMAND} --merge --out {later}",
        f"{COMMAND} --merge {later} --out {out}",
    ]
    assert sweep.summary(merged["rows"]) == "4 rows: 3 match, 1 cannot run here"
    with pytest.raises(ValueError, match="different configs"):
        sweep.merge(merged, {**merged, "config": {**merged["config"], "steps": 3}})


_SWEEP_JSON = Path(__file__).parents[2] / "docs" / "bench" / "torchvision_sweep.json"


@pytest.mark.skipif(not _SWEEP_JSON.exists(), reason="docs/bench/torchvision_sweep.json not written yet")
def test_the_docs_table_is_the_one_the_json_gives_and_covers_every_classifier() -> None:
    record = json.loads(_SWEEP_JSON.read_text())
    assert {r["model"].split(" (")[0] for r in record["rows"]} == set(zoo.model_names())
    page = (Path(__file__).parents[2] / "docs" / "own-module.md").read_text()
    for line in [*sweep.table(record["rows"]).splitlines(), sweep.summary(record["rows"])]:
        assert line in page, f"docs/own-module.md: differs from docs/bench/torchvision_sweep.json at\n{line}"


def test_workers_are_stopped_when_the_machine_runs_short_of_memory() -> None:
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    worker.start()
    with sweep._memory_floor(float("inf")) as stopped:  # never that much available: stop at once
        worker.join(30)
    assert stopped.is_set() and worker.exitcode == -9
    with sweep._memory_floor(0.0) as stopped:
        pass
    assert not stopped.is_set()
