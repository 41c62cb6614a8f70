"""Bad set-ups fail before training, with a message that names the value and the fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn

import lightning_cmp
from lightning_cmp import CMPConfigError, CMPStrategy, PartitionError
from lightning_cmp.partition import trace_chain
from tests.helpers.lit import LitCNN, setup_in_process


def test_strategy_names_are_registered_in_lightning() -> None:
    for name, schedule in (("cmp", "cmp"), ("mp", "mp"), ("gpipe", "gpipe")):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert isinstance(trainer.strategy, CMPStrategy)
        assert trainer.strategy.schedule == schedule


def test_strategy_names_are_registered_in_pytorch_lightning() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="cmp", logger=False)
    assert isinstance(trainer.strategy, pl.strategies.ParallelStrategy)
    assert type(trainer.strategy).__name__ == "CMPStrategy"
    assert trainer.strategy.is_distributed


def test_pytorch_lightning_users_pass_options_to_their_own_class() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_cmp.pytorch_lightning import CMPStrategy as PLCMPStrategy

    strategy = PLCMPStrategy(num_stages=2, averaging="parameter", average_every=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert trainer.strategy is strategy and isinstance(strategy, pl.strategies.ParallelStrategy)
    assert (strategy.num_stages, strategy.averaging, strategy.average_every) == (2, "parameter", 4)
    # one definition for both packages: the class runs strategy.py's own code (tracebacks, coverage, mypy)
    assert PLCMPStrategy.__init__.__code__.co_filename == lightning_cmp.strategy.__file__
    with pytest.raises(CMPConfigError, match="unknown averaging 'bogus'"):
        PLCMPStrategy(averaging="bogus")


def test_one_device_is_refused_at_construction() -> None:
    with pytest.raises(CMPConfigError, match=r"the Trainer has 1 .*use devices=2 or more"):
        L.Trainer(accelerator="cpu", devices=1, strategy="cmp")


@pytest.mark.parametrize(
    ("num_stages", "devices", "fits", "more"), [(3, 2, [2], 3), (2, 3, [3], 4), (4, 6, [2, 3, 6], 8)]
)
def test_num_stages_must_divide_the_workers(num_stages: int, devices: int, fits: list[int], more: int) -> None:
    # too few workers to hold the stages, or a number of workers that is not a whole number of pipelines
    message = (
        rf"num_stages={num_stages} does not divide the Trainer's {devices} workers "
        rf"\(devices={devices} x num_nodes=1\): each data-parallel pipeline takes num_stages workers. "
        rf"Use num_stages in \{fits}, or a multiple of {num_stages} workers \(e.g. {more}\)"
    )
    with pytest.raises(CMPConfigError, match=message):
        L.Trainer(accelerator="cpu", devices=devices, strategy=CMPStrategy(num_stages=num_stages))


def test_a_multiple_of_num_stages_makes_data_parallel_pipelines() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=6, strategy=CMPStrategy(num_stages=3), logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, CMPStrategy)
    assert (strategy.num_stages, strategy.num_groups) == (3, 2)


def test_unknown_strategy_name_is_lightnings_error() -> None:
    # Lightning raises this in the Trainer before any strategy code runs, and (2.6) lists no registered names,
    # only "auto, ddp, ddp_spawn, deepspeed, ...": a known limitation. The names are in the registry, where
    # StrategyRegistry.available_strategies() shows them.
    with pytest.raises(ValueError) as info:
        L.Trainer(accelerator="cpu", devices=2, strategy="cmpp")
    assert str(info.value) == (
        "You selected an invalid strategy name: `strategy='cmpp'`. It must be either a string or an instance of "
        "`lightning.pytorch.strategies.Strategy`. Example choices: auto, ddp, ddp_spawn, deepspeed, ... Find a "
        "complete list of options in our documentation at https://lightning.ai"
    )
    assert {"cmp", "mp", "gpipe"} <= set(L.pytorch.strategies.StrategyRegistry.available_strategies())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "cpm"}, r"unknown schedule 'cpm'; valid: (.*, )?'cmp', (.*, )?'mp'"),
        ({"partition": "even"}, r"unknown partition 'even'; valid: 'balanced', 'bipartition', 'uniform'"),
        ({"averaging": "weights"}, r"unknown averaging 'weights'; valid: 'gradient', 'parameter', 'sharded'"),
        ({"average_every": 0}, r"average_every=0; use a whole number of steps >= 1"),
        ({"average_every": 4}, r"average_every=4 only applies to averaging='parameter'"),
        ({"num_stages": 0}, r"num_stages=0; use a whole number >= 1 \(None: one stage per worker; 1: the whole model"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(CMPConfigError, match=message):
        CMPStrategy(**kwargs)


def _setup(model: L.LightningModule, devices: int = 2, **strategy_kwargs: object) -> None:
    """Run the strategy's set-up checks in this process (they happen before any collective)."""
    setup_in_process(model, CMPStrategy(**strategy_kwargs), devices)  # type: ignore[arg-type]


class Manual(LitCNN):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(LitCNN):
    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.net[:2].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)


class DataDependent(LitCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.net(x)
        return self.net(-x)


class Tiny(LitCNN):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(768, 10))


def test_manual_optimization_is_refused() -> None:
    with pytest.raises(CMPConfigError, match=r"Manual.automatic_optimization is False.*strategy='ddp'"):
        _setup(Manual())


def test_several_optimizers_are_refused() -> None:
    # Lightning's own set-up error: several optimizers need manual optimization, which cmp refuses above.
    with pytest.raises(RuntimeError, match=r"multiple optimizers is only supported with manual optimization"):
        _setup(TwoOptimizers())


def test_untraceable_model_names_the_module_and_the_fixes() -> None:
    # Explicit cuts index the traced graph's blocks, so they are no way around tracing: the message says so.
    # Only children worth splitting are suggested: 'net', not the metrics 'val_acc' and 'test_acc'.
    for partition in ("balanced", [4]):
        with pytest.raises(PartitionError) as info:
            _setup(DataDependent(), partition=partition)
        assert str(info.value) == (
            "cannot trace DataDependent with torch.fx: symbolically traced variables cannot be used as inputs to "
            "control flow. lightning_cmp cuts the traced graph into stages, so explicit partition=[...] cuts need a "
            "traceable module too. Fix: pass module='<submodule>' to split a traceable submodule (its children "
            "holding layers: 'net'), or make the control flow static (no Python if/for/while on tensor values in "
            "forward)"
        )
    _setup(DataDependent(), module="net")  # the suggested fix works


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.act, self.loss = nn.Sequential(nn.Identity(), nn.ReLU()), nn.ReLU(), nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > 0 else x


def test_untraceable_submodule_is_named_with_its_type_and_children_worth_splitting() -> None:
    # A container without parameters is still worth splitting; a lone activation or a loss is not.
    message = r"^cannot trace model\.gated \(Gated\) with torch\.fx: .* \(its children holding layers: 'body'\), or"
    with pytest.raises(PartitionError, match=message):
        trace_chain(Gated(), name="model.gated")


def test_more_stages_than_blocks() -> None:
    assert trace_chain(Tiny()).num_blocks == 2
    with pytest.raises(PartitionError, match=r"num_stages=3 but the model has only 2 blocks.*num_stages<=2"):
        _setup(Tiny(), devices=3)  # fails at set-up, before the first batch


def test_explicit_cuts_are_checked_at_setup() -> None:
    with pytest.raises(
        PartitionError, match=r"cut 14 is out of range: the model has 8 blocks, so cuts must lie in 1\.\.7"
    ):
        _setup(LitCNN(), partition=[14])


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        ([5, 2, 7], r"partition=\[5, 2, 7\] gives 4 stages but num_stages=3; give 2 cut indices"),
        ([5, 2], r"partition=\[5, 2\] must be strictly increasing .*sort it and drop duplicates"),
        ([3, 3], r"partition=\[3, 3\] must be strictly increasing"),
        ([0, 4], r"cut 0 is out of range: the model has 8 blocks, so cuts must lie in 1\.\.7"),
    ],
)
def test_bad_cut_lists_are_refused_at_setup(cuts: list[int], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        _setup(LitCNN(), devices=3, partition=cuts)


@pytest.mark.parametrize(
    ("partition", "message"),
    [
        ({"forward": [3, 5], "backward": [4, 5]}, r"forward_cuts\[0\]=3 < backward_cuts\[0\]=4: blocks 3..3 would run"),
        (
            {"forward": [5, 6], "backward": [2, 4]},
            r"cuts 1 and 2 interleave: forward_cuts=\[5, 6\], backward_cuts=\[2, 4\]",
        ),
        ({"forward": [5], "backward": [4]}, r"partition=\[5\] gives 2 stages but num_stages=3"),
        ({"forward": [5, 6], "backward": [4]}, r"different numbers of stages; give num_stages - 1 cuts in each"),
        ({"fwd": [5, 6], "backward": [4, 5]}, r"exactly the keys 'forward' and 'backward'.*\{'forward': \[6\]"),
        ({"forward": "5, 6", "backward": [4, 5]}, r"'forward' and 'backward' must each be a list of block indices"),
    ],
)
def test_bad_bipartitions_are_refused_at_setup(partition: dict, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        _setup(LitCNN(), devices=3, partition=partition)


def test_bipartition_needs_a_block_more_than_stages() -> None:
    with pytest.raises(PartitionError, match=r"partition='bipartition' with 2 stages needs more than 2 blocks.*has 2"):
        _setup(Tiny(), devices=2, partition="bipartition")


class TupleOutput(LitCNN):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.net(x), x.mean()


class DictOutput(LitCNN):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": self.net(x), "mean": x.mean()}


class ListOutput(LitCNN):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [self.net(x), x.mean()]


@pytest.mark.parametrize(("model", "kind"), [(TupleOutput, "tuple"), (DictOutput, "dict"), (ListOutput, "list")])
def test_several_outputs_are_refused_at_setup_with_the_fix(model: type[LitCNN], kind: str) -> None:
    with pytest.raises(PartitionError) as info:
        _setup(model())
    assert str(info.value) == (
        f"{model.__name__}.forward returns a {kind}; lightning_cmp splits modules that return one tensor: pass "
        "module='<submodule>' to split the submodule that does (its children holding layers: 'net')"
    )
    _setup(model(), module="net")  # splitting the submodule that returns one tensor works


def test_non_tensor_inputs_are_refused_before_any_message() -> None:
    model = LitCNN()
    _setup(model)
    with pytest.raises(CMPConfigError, match=r"called with a dict; .*unpack the batch in training_step"):
        model({"image": torch.randn(2, 3, 16, 16)})


def test_unsupported_precision_is_refused_at_setup() -> None:
    class QuantizingPrecision(Precision):  # stands in for bitsandbytes / Transformer Engine (CUDA only)
        pass

    with pytest.raises(CMPConfigError, match=r"does not support the QuantizingPrecision precision plugin; use"):
        _setup_strategy(LitCNN(), CMPStrategy(precision_plugin=QuantizingPrecision()))


def _setup_strategy(model: L.LightningModule, strategy: CMPStrategy) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, max_epochs=1)
    trainer.state.fn = L.pytorch.trainer.states.TrainerFn.FITTING
    model.trainer = trainer
    strategy.connect(model)
    strategy._lightning_module = model
    strategy.setup(trainer)


def test_module_name_must_exist() -> None:
    with pytest.raises(CMPConfigError, match=r"module='body'.*LitCNN has no submodule 'body'.*'net'"):
        _setup(LitCNN(), module="body")


def test_package_exports() -> None:
    assert lightning_cmp.CMPStrategy is CMPStrategy


def test_max_restarts_is_checked() -> None:
    with pytest.raises(CMPConfigError, match=r"max_restarts=-1; use 0"):
        CMPStrategy(max_restarts=-1)
    with pytest.raises(CMPConfigError, match=r"with num_nodes=2 start the script with torchrun --max-restarts=2"):
        L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy=CMPStrategy(max_restarts=2), logger=False)
