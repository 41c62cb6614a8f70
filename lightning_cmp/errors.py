"""Exceptions raised for user mistakes: each says what is wrong, with the values, and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CMPConfigError",
    "CopiesDriftedError",
    "MicrobatchLossMismatch",
    "PartitionError",
    "ScheduleError",
    "unknown_name",
]


class CMPConfigError(ValueError):
    """A strategy argument or Trainer set-up that lightning_cmp cannot run; raised before training starts."""


class PartitionError(ValueError):
    """The model cannot be split as asked (not traceable, too few cut points, bad cut indices)."""


class CopiesDriftedError(RuntimeError):
    """The two copies of a stage, meant to stay bitwise identical, no longer are (something changed one only)."""


class MicrobatchLossMismatch(CMPConfigError):
    """With microbatches, the step's loss is not made of per-sample terms, so its microbatches' gradients (computed
    from each microbatch's loss alone) are not the whole batch's gradient; raised on every rank alike."""


class ScheduleError(RuntimeError):
    """A schedule is invalid or deadlocks; the message carries the rank x step grid with the failing cell."""


def unknown_name(what: str, value: object, valid: Iterable[str]) -> CMPConfigError:
    """The error for a name missing from a registry, listing the valid names.

    Examples:
        >>> str(unknown_name("schedule", "cpm", ["cmp", "mp"]))
        "unknown schedule 'cpm'; valid: 'cmp', 'mp'"
    """
    names = ", ".join(repr(v) for v in sorted(valid))
    return CMPConfigError(f"unknown {what} {value!r}; valid: {names}")
