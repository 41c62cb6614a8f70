"""A single-process replay of an asynchronous pipeline, written from the schedule's arithmetic alone.

Mini-batches are processed one after the other. Stage ``k``'s forward of mini-batch ``j`` (counted from the fill)
uses the weights it had after ``max(0, j - (K - k - 1))`` updates, its backward those after ``j`` updates
(``current``), the forward's (``stash``), or SpecTrain's predictions ``W - s * lr * v`` with ``s = floor(k/2) +
K - k - 1`` forward and ``floor(k/2)`` backward (``predict``). A backward takes its input gradient from the
backward's weights and its weight gradient from the forward's activations. The optimizer is SGD with momentum
written out by hand (``v = mu * v + g``, first ``v = g``; ``W = W - lr * v``). Nothing here imports the runtime's
schedule or weight code: it is the independent account the multi-process runs are compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["replay"]

Weights = dict[str, Tensor]


def _ahead(policy: str, k: int, num_stages: int) -> tuple[int, int]:
    if policy != "predict":
        return 0, 0
    return k // 2 + num_stages - k - 1, k // 2


def replay(
    stages: Sequence[nn.Module],
    batches: Sequence[tuple[Tensor, Tensor]],
    policy: str,
    lr: float,
    momentum: float,
    fills: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
) -> tuple[list[Weights], list[float], dict[tuple[int, int, str], tuple[int, int]]]:
    """Train ``stages`` (modules run in order; the last one's output goes into cross-entropy) on ``batches``.

    ``fills``: how many mini-batches each fill of the pipeline takes before it is drained (default: all at once).
    ``lrs``: the learning rate each mini-batch's update uses (default ``lr``; predictions always use ``lr``).
    Returns each stage's final weights, each mini-batch's loss, and the version log ``(stage, batch, pass) ->
    (updates since the fill, predicted steps ahead)``.
    """
    k_count = len(stages)
    names = [[n for n, p in s.named_parameters() if p.requires_grad] for s in stages]
    history: list[list[Weights]] = [[{n: p.detach().clone() for n, p in s.named_parameters()}] for s in stages]
    buffers: list[list[Weights | None]] = [[None] for _ in stages]  # momentum after each update
    losses: list[float] = []
    log: dict[tuple[int, int, str], tuple[int, int]] = {}
    fills = list(fills) if fills is not None else [len(batches)]
    assert sum(fills) == len(batches), "fills must cover the batches"
    offset = 0
    for fill in fills:
        starts = [len(h) - 1 for h in history]  # updates made before this fill, per stage
        for j in range(fill):
            x, y = batches[offset + j]
            leaves, outputs, inputs, backward_weights = [], [], [], []
            h = x
            for k, stage in enumerate(stages):
                base_f = max(0, j - (k_count - k - 1))
                base_b = base_f if policy == "stash" else j
                ahead_f, ahead_b = _ahead(policy, k, k_count)
                log[(k, j, "forward")] = (base_f, ahead_f)
                log[(k, j, "backward")] = (base_b, ahead_b)
                w_f = _weights(history[k], buffers[k], starts[k] + base_f, ahead_f, lr, names[k])
                backward_weights.append(_weights(history[k], buffers[k], starts[k] + base_b, ahead_b, lr, names[k]))
                leaf = {n: w.clone().requires_grad_() for n, w in w_f.items()}
                h_in = h.detach().requires_grad_(k > 0)
                out = torch.func.functional_call(stage, leaf, (h_in.clone() if k else h_in,), strict=False)
                leaves.append(leaf)
                inputs.append(h_in)
                outputs.append(out)
                h = out
            loss = F.cross_entropy(h, y)
            losses.append(float(loss.detach()))
            grad = torch.autograd.grad(loss, h)[0]
            grads: list[Weights] = [{} for _ in stages]
            for k in reversed(range(k_count)):
                with torch.no_grad():
                    for n, leaf in leaves[k].items():
                        leaf.data.copy_(backward_weights[k][n])
                wrt = [*leaves[k].values(), *([inputs[k]] if k else [])]
                got = torch.autograd.grad(outputs[k], wrt, grad, allow_unused=True)
                grads[k] = {
                    n: g if g is not None else torch.zeros_like(leaves[k][n])
                    for n, g in zip(leaves[k], got, strict=False)
                }
                grad = got[-1] if k else grad
            rate = lr if lrs is None else lrs[offset + j]
            for k in range(k_count):
                _sgd(history[k], buffers[k], grads[k], rate, momentum)
        offset += fill
    return [h[-1] for h in history], losses, log


def _weights(
    history: list[Weights], buffers: list[Weights | None], version: int, ahead: int, lr: float, names: list[str]
) -> Weights:
    weights, buffer = history[version], buffers[version]
    if not ahead or buffer is None:
        return {n: weights[n] for n in names}
    return {n: weights[n] - ahead * lr * buffer[n] for n in names}


def _sgd(history: list[Weights], buffers: list[Weights | None], grads: Weights, lr: float, momentum: float) -> None:
    weights, buffer = history[-1], buffers[-1]
    new_buffer = {n: g.clone() if buffer is None else momentum * buffer[n] + g for n, g in grads.items()}
    history.append({n: w - lr * new_buffer[n] if n in grads else w for n, w in weights.items()})
    buffers.append(new_buffer if momentum else None)
