"""What importing the package loads, checked in fresh interpreters (not by reading the source)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.python import run_python

HEAVY = ("torch", "lightning", "pytorch_lightning")


def _loaded(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    return json.loads(run_python("-c", code).stdout.strip().splitlines()[-1])


def _heavy_after(imports: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after running the ``imports`` lines."""
    found = f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
    return list(_loaded("\n".join(["import json, sys", *imports, found])))


def test_the_schedule_layer_and_the_partition_solver_import_without_torch_or_lightning() -> None:
    imports = [
        "import lightning_cmp, lightning_cmp.schedule, lightning_cmp.partition, lightning_cmp.partition.solver",
        "import lightning_cmp.partition.bipartition, lightning_cmp.errors",
        "from lightning_cmp.schedule import SCHEDULES, simulate",
        "from lightning_cmp.partition import bipartition_cuts, resolve_cuts",
    ]
    assert _heavy_after(imports) == []


def test_the_strategys_parts_in_glue_import_without_lightning() -> None:
    # what the strategy decides or computes without Lightning's classes (lightning_cmp/glue) loads no Lightning
    imports = ["from lightning_cmp.glue import checkpoints, checks, collectives, module, optimizers, pipeline"]
    assert _heavy_after(imports, heavy=("lightning", "pytorch_lightning")) == []


def test_importing_checkpoint_io_before_lightning_still_registers_the_strategies() -> None:
    # lightning_cmp.checkpoint_io imports Lightning, whose import registers the strategies by importing
    # lightning_cmp.strategy: that must not need checkpoint_io, half-built at that moment
    code = (
        "import json, warnings\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "from lightning_cmp.checkpoint_io import AtomicCheckpointIO\n"
        "import lightning.pytorch as pl\n"
        "trainer = pl.Trainer(accelerator='cpu', devices=2, strategy='cmp', logger=False)\n"
        "print(json.dumps(isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)))"
    )
    assert _loaded(code) is True


@pytest.mark.parametrize("lightning_first", [False, True])
def test_the_strategies_are_registered_whichever_is_imported_first(lightning_first: bool) -> None:
    imports = ["import lightning_cmp", "import lightning.pytorch as pl"]
    code = "\n".join(
        [
            "import json",
            *(reversed(imports) if lightning_first else imports),
            "from lightning.pytorch.strategies import StrategyRegistry",
            "trainer = pl.Trainer(accelerator='cpu', devices=2, strategy='cmp', logger=False)",
            "names = sorted(n for n in ('cmp', 'mp', 'gpipe', 'sharded_dp', 'spectrain') if n in StrategyRegistry)",
            "print(json.dumps([names, type(trainer.strategy) is lightning_cmp.CMPStrategy]))",
        ]
    )
    assert _loaded(code) == [["cmp", "gpipe", "mp", "sharded_dp", "spectrain"], True]


def test_a_missing_name_is_an_attribute_error() -> None:
    import lightning_cmp
    import lightning_cmp.partition

    with pytest.raises(AttributeError, match="no attribute 'Strategy'"):
        lightning_cmp.Strategy  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'chain_of'"):
        lightning_cmp.partition.chain_of  # noqa: B018
