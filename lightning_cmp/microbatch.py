"""The loss of one microbatch from the user's unchanged ``training_step`` (micro-batched ``cmp``).

A schedule that interleaves forwards and backwards needs each microbatch's loss while other microbatches are
still in the pipeline, but the user's loss lives in ``training_step``, after ``self(x)`` returned the whole
batch's output. So the last stage's rank calls ``training_step`` once more per microbatch, *quietly*, on the
rows of that microbatch (every tensor in the batch whose first dimension is the batch size is sliced), with
``self(x)`` returning that microbatch's output. Quietly means: ``self.log``/``self.log_dict`` do nothing and the
states of torchmetrics metrics are put back afterwards, so what is logged and measured comes only from the
ordinary call on the whole batch, on every rank alike (logging stays symmetric). The design page explains why.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_cmp.errors import CMPConfigError

__all__ = ["MicrobatchLoss"]


class MicrobatchLoss:
    """``loss_fn(rows, output)`` for a pipeline: ``module.training_step`` run quietly on the batch rows ``rows``.

    ``step_args``/``step_kwargs`` are the arguments Lightning passed to ``training_step`` for the whole batch;
    ``inputs`` is the tensor that step passed to the split module (its rows are what ``self(x)`` must be called
    with in the microbatch's call). While a call runs, `active` is set and the strategy's patched forward returns
    `forward` instead of running the pipeline.

    Examples:
        >>> fn = MicrobatchLoss(module, (batch, 0), {}, inputs=x)  # doctest: +SKIP
        >>> fn(slice(0, 8), output_of_rows_0_to_8)  # the training_step's loss on those rows  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, step_args: tuple[Any, ...], step_kwargs: dict[str, Any], inputs: Tensor):
        self.module = module
        self.step_args = step_args
        self.step_kwargs = step_kwargs
        self.inputs = inputs
        self.active = False
        self._rows = slice(0)
        self._output: Tensor | None = None
        self._calls = 0

    def __call__(self, rows: slice, output: Tensor) -> Tensor:
        size = int(self.inputs.shape[0])

        def narrow(t: Tensor) -> Tensor:
            return t[rows] if t.dim() > 0 and t.shape[0] == size else t

        args = apply_to_collection(self.step_args, Tensor, narrow)
        kwargs = apply_to_collection(self.step_kwargs, Tensor, narrow)
        self.active, self._rows, self._output, self._calls = True, rows, output, 0
        try:
            with _quiet(self.module):
                result = self.module.training_step(*args, **kwargs)  # type: ignore[operator]
        finally:
            self.active, self._output = False, None
        if self._calls != 1:
            raise CMPConfigError(
                f"training_step called the split module {self._calls} times; with num_microbatches > 1 `cmp` computes "
                "each microbatch's loss by running training_step on that microbatch, which needs exactly one call "
                "of the model per step. Use num_microbatches=1, or schedule='gpipe'"
            )
        loss = result.get("loss") if isinstance(result, Mapping) else result
        if not isinstance(loss, Tensor):
            raise CMPConfigError(
                f"training_step returned {type(result).__name__} for a microbatch; with num_microbatches > 1 `cmp` "
                "needs the loss (a tensor, or a dict with 'loss') from every call. Skipping a batch by returning "
                "None is not possible here: use num_microbatches=1"
            )
        return loss

    def forward(self, x: Tensor) -> Tensor:
        """What ``self(x)`` returns inside a microbatch's call: that microbatch's output (``x`` is checked)."""
        assert self._output is not None
        self._calls += 1
        expected = self.inputs[self._rows]
        if not _same(x, expected):
            raise CMPConfigError(
                f"in the microbatch call of training_step the model got a different input than the rows "
                f"{self._rows.start}:{self._rows.stop} of the whole batch's input (shape {tuple(x.shape)} vs "
                f"{tuple(expected.shape)}). With num_microbatches > 1 `cmp` runs training_step once per microbatch "
                "on the rows of that microbatch, so the model's input must be computed from the batch row by row "
                "and without randomness (move random augmentation into the DataLoader or the model's forward), "
                "and every tensor of the batch must have the batch dimension first. Or use num_microbatches=1"
            )
        return self._output


class _quiet:
    """No logging and no lasting metric updates from a ``training_step`` run only for its loss."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.metrics = [m for m in module.modules() if hasattr(m, "_defaults") and hasattr(m, "_update_count")]
        self.saved: list[dict[str, Any]] = []

    def __enter__(self) -> None:
        for name in ("log", "log_dict"):
            self.module.__dict__[name] = _ignore
        self.saved = [_metric_state(m) for m in self.metrics]

    def __exit__(self, *exc: object) -> None:
        for name in ("log", "log_dict"):
            self.module.__dict__.pop(name, None)
        for metric, state in zip(self.metrics, self.saved, strict=True):
            for key, value in state.items():
                setattr(metric, key, value)


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and values, NaN equal to NaN (a corrupt sample is the same sample in both calls)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    return torch.equal(a, b)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _metric_state(metric: nn.Module) -> dict[str, Any]:
    """A torchmetrics ``Metric``'s accumulated state and bookkeeping, copied."""
    names = [*metric.__dict__.get("_defaults", {}), "_update_count", "_computed", "_forward_cache"]
    return {name: copy.deepcopy(getattr(metric, name)) for name in names if hasattr(metric, name)}
