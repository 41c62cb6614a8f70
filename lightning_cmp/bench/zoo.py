"""torchvision's classifiers as the sweep trains them: sized for small inputs, deterministic, with a reference.

A model is built with random weights (seed 0) and 10 classes. Deterministic means training mode without
randomness or batch coupling: BatchNorm in eval mode (random running statistics, so it is not the identity),
dropout and stochastic depth off, because in training mode BatchNorm normalises each replica's half batch and
dropout draws a mask per replica (as documented), and neither can match one device bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from lightning_cmp.bench.models import make_batches

__all__ = [
    "build",
    "deterministic",
    "first_line",
    "model_names",
    "per_replica",
    "relative_error",
    "smallest_input",
    "train_reference",
]

#: Input sizes tried, smallest first (ViT-H/14 takes 28, Inception v3 75, MaxViT 224).
SIZES = (28, 32, 64, 75, 96, 128, 160, 224, 299)
STEPS, BATCH_SIZE, LR, MOMENTUM = 2, 4, 0.01, 0.9
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def model_names() -> list[str]:
    """Every classification model torchvision lists (not detection, segmentation, video or optical flow).

    Examples:
        >>> "resnet18" in model_names() and "fasterrcnn_resnet50_fpn" not in model_names()
        True
    """
    return list(torchvision.models.list_models(module=torchvision.models))


def build(
    name: str,
    size: int,
    options: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    train_batchnorm: bool = False,
) -> nn.Module:
    """Model ``name`` with random weights (seed 0), 10 classes, sized for ``size`` inputs, deterministic, in
    ``dtype``; ``options`` are more arguments for its builder (``{"aux_logits": False}``).

    Examples:
        >>> build("squeezenet1_1", 32)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": 10}
    if name.startswith("vit_"):  # the position embedding is built for one size
        kwargs["image_size"] = size
    elif name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    kwargs.update(options or {})
    with warnings.catch_warnings():  # googlenet / inception_v3: "default weight initialization will change"
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(name, **kwargs)
    return deterministic(model, train_batchnorm).to(dtype)


def deterministic(model: nn.Module, train_batchnorm: bool = False) -> nn.Module:
    """Training mode without randomness or batch coupling: BatchNorm in eval mode with random running
    statistics (``train_batchnorm``: left in training mode), dropout and stochastic depth off. Returns ``model``.

    Examples:
        >>> net = deterministic(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()))
        >>> net.training, net[1].training, net[2].training, bool(net[1].running_var.eq(1).all())
        (True, False, False, False)
    """
    model.train()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BATCHNORM) and m.running_mean is not None and m.running_var is not None:
            if train_batchnorm:
                continue
            m.eval()
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        elif isinstance(m, (*_DROPOUT, torchvision.ops.StochasticDepth)):
            m.eval()
    return model


def _sized(name: str) -> bool:
    return name.startswith(("vit_", "maxvit"))


def smallest_input(name: str, options: Mapping[str, Any] | None = None) -> int:
    """The smallest of `SIZES` whose forward (two samples, no gradients) the model accepts.

    Raises:
        RuntimeError: no size works; the message carries the model's own error.

    Examples:
        >>> smallest_input("alexnet")
        64
    """
    model: nn.Module | None = None
    reason = ""
    for size in SIZES:
        try:  # a model built for one size (ViT) refuses others at construction
            if model is None or _sized(name):
                model = build(name, size, options)
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
            return size
        except Exception as err:  # torchvision raises RuntimeError, ValueError, AssertionError... by model
            reason = first_line(err)
    raise RuntimeError(f"{name} accepts none of the input sizes {SIZES}: {reason}")


def train_reference(
    name: str,
    size: int,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    options: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    train_batchnorm: bool = False,
) -> dict[str, Tensor]:
    """Single-process SGD with momentum on the sweep's batches: the weights the split model must reach.

    ``train_batchnorm``: BatchNorm in training mode, each replica's half batch normalised on its own (`per_replica`).
    """
    model = build(name, size, options, dtype, train_batchnorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in make_batches(steps, batch_size, size):
        loss = F.cross_entropy(per_replica(model, x.to(dtype)) if train_batchnorm else model(x.to(dtype)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def per_replica(model: nn.Module, x: Tensor, num_replicas: int = 2) -> Tensor:
    """What the replicas of a ``cmp`` pipeline compute together, in one process: each share of the batch runs
    alone (training-mode BatchNorm normalises it), and the running statistics end as the replicas' mean.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> per_replica(net, torch.randn(4, 2)).shape, int(net[1].num_batches_tracked)
        (torch.Size([4, 2]), 1)
    """
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.training and m.running_mean is not None]
    start = [_buffers(m) for m in norms]
    outputs, ends = [], []
    for share in x.tensor_split(num_replicas):
        for m, state in zip(norms, start, strict=True):
            _set_buffers(m, state)
        outputs.append(model(share))
        ends.append([_buffers(m) for m in norms])
    for i, m in enumerate(norms):
        _set_buffers(m, _mean_state([end[i] for end in ends]))
    return torch.cat(outputs)


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.named_buffers(recurse=False)}


def _set_buffers(module: nn.Module, buffers: dict[str, Tensor]) -> None:
    # New tensors, not in-place copies: autograd saved the running statistics the forward used.
    for name, value in buffers.items():
        setattr(module, name, value.clone())


def _mean_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Float entries averaged, the others (``num_batches_tracked``, equal in every replica) taken from the first."""
    return {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v for k, v in states[0].items()
    }


def relative_error(state: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """The largest ``max |a - b| / max |b|`` over the tensors of ``reference``; inf when a key is missing or a
    value is not finite (a diverged run matches nothing).

    Examples:
        >>> relative_error({"w": torch.tensor([1.0, 2.5])}, {"w": torch.tensor([1.0, 2.0])})
        0.25
    """
    if set(state) != set(reference):
        return float("inf")
    worst = 0.0
    for key, ref in reference.items():
        ref64, got = ref.double(), state[key].double()
        if not (bool(ref64.isfinite().all()) and bool(got.isfinite().all())):
            return float("inf")
        worst = max(
            worst, ((got - ref64).abs().max() / ref64.abs().max().clamp_min(1e-12)).item() if ref.numel() else 0.0
        )
    return worst


def first_line(err: BaseException | str) -> str:
    r"""The first line of an error message (the type's name for an empty one).

    Examples:
        >>> first_line(ValueError("bad size\nmore detail"))
        'bad size'
    """
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
