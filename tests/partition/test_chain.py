"""Tests for tracing a module into a chain of blocks and for the stage modules built from it."""

from __future__ import annotations

import random
from itertools import pairwise
from typing import NamedTuple

import lightning as L
import pytest
import torch
import torchvision
from torch import Tensor, nn

from lightning_cmp.errors import PartitionError
from lightning_cmp.partition import Chain, trace_chain, uniform_cuts

torch.set_num_threads(1)

# Pinned block counts (a block ends where exactly one tensor flows on; in-place ops are not cut before).
# ShuffleNet splits tensors with x.chunk(2): the tuple it returns is never a cut value.
TORCHVISION_BLOCKS = {"resnet18": 14, "resnet50": 22, "vgg16": 25, "mobilenet_v2": 58, "shufflenet_v2_x0_5": 39}


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _random_cuts(num_blocks: int, rng: random.Random) -> list[int]:
    num_stages = rng.randint(2, min(5, num_blocks))
    return sorted(rng.sample(range(1, num_blocks), num_stages - 1))


def _check_transparent(model: nn.Module, chain: Chain, cuts: list[int], x: Tensor) -> None:
    """Stages composed give the original output and gradients, bitwise."""
    torch.manual_seed(1)
    expected = model(x)
    expected.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    bounds = [0, *cuts, chain.num_blocks]
    stages = [chain.stage_module(a, b) for a, b in pairwise(bounds)]
    torch.manual_seed(1)
    out = x
    for stage in stages:
        out = stage(out)
    assert torch.equal(out, expected), cuts
    out.square().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n], got[n]) for n in want), cuts
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(TORCHVISION_BLOCKS))
def test_torchvision_models_split_transparently(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    chain = trace_chain(model, name)
    assert chain.num_blocks == TORCHVISION_BLOCKS[name]
    assert len(chain.block_names) == len(set(chain.block_names)) == chain.num_blocks
    x = torch.randn(2, 3, 32, 32)
    rng = random.Random(name)
    for cuts in [uniform_cuts(chain.num_blocks, 4), *(_random_cuts(chain.num_blocks, rng) for _ in range(2))]:
        _check_transparent(model, chain, cuts, x)


def test_resnet18_block_names() -> None:
    chain = trace_chain(torchvision.models.resnet18(weights=None))
    assert chain.block_names[:4] == ["conv1", "bn1..relu", "maxpool", "layer1.0"]
    assert chain.block_names[-4:] == ["layer4.1", "avgpool", "flatten", "fc"]


def test_sequential_cnn_in_train_mode_matches_for_every_cut() -> None:
    model = _cnn()
    chain = trace_chain(model)
    # ReLU(inplace=True) joins the BatchNorm block: its input would otherwise be a leaf changed in place.
    assert chain.block_names == ["0", "1..2", "3", "4", "5", "6", "7"]
    x = torch.randn(2, 3, 8, 8)
    for cut in range(1, chain.num_blocks):
        _check_transparent(model, chain, [cut], x)


def test_stage_module_shares_state_by_reference() -> None:
    model = _cnn()
    chain = trace_chain(model)
    stage = chain.stage_module(0, 2)
    assert stage.get_parameter("0.weight") is model[0].weight
    assert stage.get_buffer("1.running_mean") is model[1].running_mean
    assert {id(p) for p in stage.parameters()} == {id(p) for p in [*model[0].parameters(), *model[1].parameters()]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    stage(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_stage_state_names() -> None:
    chain = trace_chain(_cnn())
    assert chain.stage_state_names(0, 2) == (
        ["0.weight", "0.bias", "1.weight", "1.bias"],
        ["1.running_mean", "1.running_var", "1.num_batches_tracked"],
    )
    assert chain.stage_state_names(2, 6) == (["3.weight", "3.bias"], [])
    with pytest.raises(PartitionError, match=r"blocks \[3, 3\) are not a stage of model: it has 7 blocks"):
        chain.stage_state_names(3, 3)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.mid = nn.Tanh()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x) * self.scale
        x = self.mid(x)
        return nn.functional.linear(x, self.embed.weight)


def test_tied_weights_are_detected() -> None:
    chain = trace_chain(_Tied())
    assert chain.block_names == ["embed", "mul", "mid", "linear"]
    chain.check_cuts_share_nothing([])
    with pytest.raises(PartitionError, match=r"parameter 'embed.weight' is used by stages 0 and 1 \(tied weights\)"):
        chain.check_cuts_share_nothing([2])
    with pytest.raises(
        PartitionError, match=r"'embed.weight' is used by stages 0 and 2 .* keep its users in one stage"
    ):
        chain.check_cuts_share_nothing([1, 2])
    assert chain.stage_state_names(1, 2) == (["scale"], [])
    assert chain.stage_state_names(2, 4) == (["embed.weight"], [])


class _LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()
        self.unused = nn.Linear(100, 100)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return self.net(x)


def test_lightning_module_root_is_not_copied_into_stages() -> None:
    model = _LitNet()
    chain = trace_chain(model, "model")
    assert chain.block_names[0] == "net.0"
    stage = chain.stage_module(0, chain.num_blocks)
    assert not isinstance(stage, L.LightningModule)
    assert [n for n, _ in stage.named_children()] == ["net"]
    assert stage.get_submodule("net.0") is model.net[0]
    assert not any(n.startswith("unused") for n, _ in stage.named_parameters())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(stage(x), model(x))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.body(x)
        return x


def test_untraceable_module_error() -> None:
    with pytest.raises(PartitionError) as info:
        trace_chain(_Branchy(), "model")
    message = str(info.value)
    assert "cannot trace model (_Branchy) with torch.fx: symbolically traced variables" in message
    assert "module='<submodule>'" in message and "'body'" in message and "control flow static" in message


class _TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x), x


class _TwoIn(nn.Module):
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y


class _Size(nn.Module):
    def forward(self, x: Tensor) -> int:
        return x.size(0)


class _Outputs(NamedTuple):
    logits: Tensor
    aux: Tensor


class _NamedOut(_TwoOut):
    def forward(self, x: Tensor) -> _Outputs:  # type: ignore[override]
        return _Outputs(self.net(x), x)  # like torchvision's GoogLeNetOutputs in training mode


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_TwoOut(), r"model.forward returns a tuple; lightning_cmp splits modules that return one tensor: .*'net'"),
        (_TwoIn(), r"model.forward needs 2 inputs \(x, y\); lightning_cmp splits modules that take one tensor"),
        (_Size(), r"model.forward returns a call_method size \(not a tensor\)"),
        (_NamedOut(), r"model.forward returns a _Outputs \(not a tensor\); .*tensor: build it to return one tensor"),
    ],
)
def test_signature_errors(module: nn.Module, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        trace_chain(module, "model")


class _Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        n = x.size(0)  # a size crossing a position must not make it a cut
        y = self.a(x)
        return self.b(y).reshape(n, -1)


def test_non_tensor_values_block_cuts() -> None:
    chain = trace_chain(_Reshape())
    # The size n is live from the input to the reshape, so no position carries exactly one value.
    assert chain.num_blocks == 1


def test_reused_module_is_named_and_flagged() -> None:
    lin = nn.Linear(4, 4)
    chain = trace_chain(nn.Sequential(lin, nn.ReLU(), lin))
    assert chain.block_names == ["0", "1", "0#1"]
    with pytest.raises(PartitionError, match=r"parameter '0.weight' is used by stages 0 and 1"):
        chain.check_cuts_share_nothing([2])
