"""Random numbers of stage forwards: each draws from its own seed, so replicas and microbatches get their own masks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ForwardSeeds", "seeded", "stage_seed"]

SeedKey = tuple[int, int, int, int]  # (base seed, phase: 1 training / 0 evaluation, step, repeat within the step)


class ForwardSeeds:
    """Hands every call of a pipeline its seed key ``(seed, phase, step, repeat)``.

    ``step`` comes from the caller (the trainer's global step, which a resumed run restores) or, when None,
    counts this object's calls. Calls with the same step (gradient accumulation, a second forward in one step)
    get increasing ``repeat``. Training and evaluation calls are counted apart, so a validation run between two
    training steps does not shift the masks of the next training step.

    Examples:
        >>> seeds = ForwardSeeds(seed=7)
        >>> seeds.key(step=3, training=True), seeds.key(step=3, training=True), seeds.key(step=4, training=True)
        ((7, 1, 3, 0), (7, 1, 3, 1), (7, 1, 4, 0))
        >>> seeds.key(step=None, training=False), seeds.key(step=None, training=False)
        ((7, 0, 0, 0), (7, 0, 1, 0))
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._last: dict[bool, tuple[int, int]] = {}  # phase -> (step, repeat) of its latest call

    def key(self, step: int | None, training: bool) -> SeedKey:
        last_step, repeat = self._last.get(training, (-1, -1))
        step = last_step + 1 if step is None else step
        repeat = repeat + 1 if step == last_step else 0
        self._last[training] = (step, repeat)
        return (self.seed, int(training), step, repeat)


def stage_seed(key: SeedKey, replica: int, stage: int, microbatch: int) -> int:
    """The 63-bit seed of one stage forward: a hash of ``key`` and the forward's (replica, stage, microbatch).

    A hash, not a sum, so that no two coordinates collide (step 1 of microbatch 0 vs step 0 of microbatch 1).

    Examples:
        >>> key = (0, 1, 5, 0)
        >>> stage_seed(key, 0, 1, 0) == stage_seed(key, 0, 1, 0), stage_seed(key, 0, 1, 0) == stage_seed(key, 1, 1, 0)
        (True, False)
    """
    text = repr((*key, replica, stage, microbatch)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body on the CPU generator (and ``device``'s, when it is a GPU) seeded with ``seed``, then restore.

    The caller's random stream continues as if the body drew nothing, so code outside the pipeline (the loss,
    augmentation, dropout in layers that are not split) draws the same numbers on every worker.

    Examples:
        >>> draws = []
        >>> for _ in range(2):
        ...     with seeded(1, torch.device("cpu")):
        ...         draws.append(torch.rand(2))
        >>> torch.equal(*draws)
        True
    """
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for gpu in cuda:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield
