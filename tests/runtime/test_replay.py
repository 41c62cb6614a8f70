"""Replay rebuilds the graph of a recorded forward: gradients equal the eager ones bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.partition import trace_chain
from lightning_cmp.runtime.replay import Recorder, Replayer, profile_replay, record
from lightning_cmp.runtime.rng import seeded


def _blocks() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "conv_bn_relu_inplace": (
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
            (4, 3, 8, 8),
        ),
        "vgg_conv_relu_inplace": (
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3)),
            (4, 3, 9, 9),
        ),
        "resnet_basic_block": (torchvision.models.resnet.BasicBlock(8, 8), (4, 8, 6, 6)),
        "mlp_dropout": (
            nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)),
            (4, 3, 4, 4),
        ),
    }


@pytest.mark.parametrize("name", list(_blocks()))
def test_replayed_graph_gives_the_eager_gradients(name: str) -> None:
    block, shape = _blocks()[name]
    block.train()
    twin = copy.deepcopy(block)  # the backward worker's copy: same weights, its own buffers
    x = torch.randn(shape)
    # forward worker: an eager forward and backward (the reference) and a recorded forward
    reference = copy.deepcopy(block)
    leaf = x.clone().requires_grad_()
    with seeded(7, x.device):
        out_ref = reference(leaf.clone())
    grad_out = torch.randn_like(out_ref)
    out_ref.backward(grad_out)
    with seeded(7, x.device):
        recorded_out, recording = record(block, x)
    assert torch.equal(recorded_out, out_ref.detach())
    # backward worker: replay on its own copy, then backward
    leaf_j = x.clone().requires_grad_()
    replayer = Replayer(recording)
    with seeded(7, x.device), replayer:
        out_j = twin(leaf_j.clone())
    replayer.finish()
    assert torch.equal(out_j.detach(), out_ref.detach())
    out_j.backward(grad_out)
    assert torch.equal(leaf_j.grad, leaf.grad)
    for (n, p), q in zip(reference.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    for b_ref, b_j, b_rec in zip(reference.buffers(), twin.buffers(), block.buffers(), strict=True):
        assert torch.equal(b_ref, b_j) and torch.equal(b_ref, b_rec)  # running statistics advanced alike


def test_heavy_ops_are_not_recomputed() -> None:
    calls = []
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 6, 6)
    _, recording = record(conv, x)
    # a recording whose values differ from what the op would compute: replay must return it, not recompute
    fake = [torch.full_like(recording[0], 3.0)]
    with Replayer(fake):
        out = conv(x.requires_grad_())
    assert torch.equal(out, fake[0])


def test_a_block_that_runs_differently_is_refused() -> None:
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    _, recording = record(block[:1], torch.randn(2, 3, 8, 8))
    with pytest.raises(CMPConfigError, match=r"ran differently.*recorded only 1"), Replayer(recording):
        block(torch.randn(2, 3, 8, 8))
    _, recording = record(block, torch.randn(2, 3, 8, 8))
    with pytest.raises(CMPConfigError, match=r"output 0 is \(2, 4, 6, 6\).*here \(1, 4, 6, 6\)"), Replayer(recording):
        block(torch.randn(1, 3, 8, 8))
    replayer = Replayer(recording)
    with replayer:
        block[0](torch.randn(2, 3, 8, 8))
    with pytest.raises(CMPConfigError, match="1 recorded outputs were left over"):
        replayer.finish()


def test_recorder_keeps_values_an_inplace_op_changes_later() -> None:
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    x = torch.randn(3, 4)
    with Recorder() as rec:
        block(x)
    assert (rec.outputs[0] < 0).any()  # the linear output before the in-place ReLU


def test_profile_replay_reports_what_moves_and_restores_buffers() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    before = [b.clone() for b in net.buffers()]
    chain = trace_chain(net)
    rows = profile_replay(chain, torch.randn(5, 3, 8, 8), repeats=1)
    assert len(rows) == chain.num_blocks
    recorded = [r[1] for r in rows]
    assert recorded[0] == 5 * 4 * 6 * 6 * 4  # the conv output, float32
    assert recorded[-1] == 5 * 2 * 4  # the linear output
    assert all(r[0] >= 0 for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))
