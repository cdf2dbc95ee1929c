"""Incremental-sparsity schedules (METHOD.md §3): the fraction ``p`` of blocks kept dense at training progress ``t``.

Every schedule is a pure function of an explicit progress value ``t`` in **epochs** (fractional epochs allowed).
``p`` falls from 1 at ``start`` to 0 at ``end``, with ``u = clip((t - start) / (end - start), 0, 1)``.
The paper updates ``p`` once per epoch (a staircase: ``t`` is floored, epoch 0 is fully dense); pass
``per_step=True`` for a smooth ramp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["SCHEDULES", "check_progress", "dense_fraction", "ramp_fraction"]


def ramp_fraction(t: float, start: float, end: float) -> float:
    """``u = clip((t - start) / (end - start), 0, 1)``; a zero-length ramp is a step at ``start``."""
    if end <= start:
        return 0.0 if t < start else 1.0
    return min(max((t - start) / (end - start), 0.0), 1.0)


def _linear(t: float, start: float, end: float, b: float) -> float:
    return 1.0 - ramp_fraction(t, start, end)


def _cubic(t: float, start: float, end: float, b: float) -> float:
    return (1.0 - ramp_fraction(t, start, end)) ** 3


def _cos(t: float, start: float, end: float, b: float) -> float:
    u = ramp_fraction(t, start, end)
    return 0.0 if u >= 1.0 else math.cos(math.pi / 2 * u)


def _exp(t: float, start: float, end: float, b: float) -> float:
    if end <= start:
        return 1.0 - ramp_fraction(t, start, end)
    tc = min(max(t, start), end)
    return 1.0 - (1.0 - math.exp(-b * (tc - start))) / (1.0 - math.exp(-b * (end - start)))


def _none(t: float, start: float, end: float, b: float) -> float:
    return 0.0


#: name -> ``p(t, start, end, b)``; the one lookup from a schedule name to its function.
SCHEDULES: dict[str, Callable[[float, float, float, float], float]] = {
    "linear": _linear,
    "cubic": _cubic,
    "cos": _cos,
    "exp": _exp,
    "none": _none,
}


def check_progress(progress: float) -> float:
    """``progress`` (training progress in epochs) as a float, if it is a finite number ``>= 0``.

    Raises:
        ValueError: anything else (negative, NaN, infinite, a bool, not a number); the message says what to pass.
    """
    try:
        value = float(progress) if not isinstance(progress, (bool, str)) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"progress must be a finite number of epochs >= 0 (0 = the start of training; fractions for a per-step "
            f"ramp: epoch + step / steps_per_epoch), got {progress!r}"
        )
    return value


def dense_fraction(
    schedule: str, t: float, start: float, end: float, *, per_step: bool = False, b: float = 0.05
) -> float:
    """Fraction of blocks kept dense at progress ``t`` (epochs).

    Args:
        schedule: one of [`SCHEDULES`][maxq.SCHEDULES].
        t: training progress in epochs (``epoch + step / steps_per_epoch`` for a per-step ramp).
        start: ramp start in epochs: ``p = 1`` up to it.
        end: ramp end in epochs: ``p = 0`` from it on (``end >= start``).
        per_step: smooth ramp; by default ``t`` is floored to whole epochs (the paper's staircase).
        b: rate of the ``exp`` schedule, per epoch.

    Returns:
        ``p`` in ``[0, 1]``, non-increasing in ``t``.

    Raises:
        ValueError: an unknown schedule.

    Example:
        >>> dense_fraction("linear", 15, 0, 30)
        0.5
    """
    try:
        fn = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}") from None
    if not per_step:
        t = math.floor(t)
    return min(max(fn(float(t), float(start), float(end), float(b)), 0.0), 1.0)
