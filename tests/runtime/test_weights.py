"""The weights each pass of an asynchronous pipeline uses: current, stashed and predicted (in one process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.runtime.weights import StageWeights, check_predictable, update_direction


def _stepped(optimizer_cls: type[torch.optim.Optimizer], **kw: object) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = optimizer_cls(net.parameters(), **kw)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    return net, opt


def test_sgd_direction_is_lr_times_the_momentum_buffer() -> None:
    net, opt = _stepped(torch.optim.SGD, lr=0.1, momentum=0.9)
    tensor, scale = update_direction(opt)(net.weight)  # type: ignore[misc]
    assert tensor is opt.state[net.weight]["momentum_buffer"] and scale == 0.1


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_direction_is_the_step_adam_just_took(cls: type[torch.optim.Optimizer]) -> None:
    net, opt = _stepped(cls, lr=0.01, weight_decay=0.0)
    before = net.weight.detach().clone()
    opt.zero_grad()
    net(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    # with the moments after this step, the direction reproduces the update this step made
    tensor, scale = update_direction(opt)(net.weight)  # type: ignore[misc]
    assert torch.allclose(tensor * scale, before - net.weight.detach(), rtol=1e-5, atol=1e-8)


def test_no_direction_before_the_first_update() -> None:
    net = nn.Linear(2, 2)
    assert update_direction(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))(net.weight) is None


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), r"SGD has momentum=0 in parameter group\(s\) \[0\].*momentum=0.9"),
        (lambda p: torch.optim.Adagrad(p), r"Adagrad is neither SGD with momentum nor Adam/AdamW.*'pipedream'"),
        (lambda p: torch.optim.Adam(p, amsgrad=True), r"Adam\(amsgrad=True\) is not supported"),
    ],
)
def test_unpredictable_optimizers_are_refused(optimizer, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CMPConfigError, match=message):
        check_predictable(optimizer(nn.Linear(2, 2).parameters()))


def test_current_shares_storage_stash_copies_predict_reuses_one_scratch() -> None:
    net = nn.Linear(2, 2)
    current = StageWeights(net, "current", 2, 0).for_forward(0)
    assert current["weight"].data_ptr() == net.weight.data_ptr()
    stash = StageWeights(net, "stash", 2, 0)
    leaves = [stash.for_forward(j)["weight"] for j in range(2)]
    assert leaves[0].data_ptr() != net.weight.data_ptr() and leaves[0].data_ptr() != leaves[1].data_ptr()
    assert stash.stashed_bytes() == 2 * 6 * 4  # two mini-batches in flight, weight and bias each
    _, opt = _stepped(torch.optim.SGD, lr=0.1, momentum=0.9)
    predicted = StageWeights(net, "predict", 2, 0)
    predicted.direction = update_direction(opt)  # no state for this net: the weights themselves
    first, second = predicted.for_forward(0), predicted.for_forward(1)
    assert first["weight"] is second["weight"] and predicted.stashed_bytes() == 6 * 4
    assert torch.equal(first["weight"], net.weight)
