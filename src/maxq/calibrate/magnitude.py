"""Magnitude N:M pruning of a ``[O, D]`` weight (the baseline the calibrated saliencies are measured against)."""

from __future__ import annotations

from torch import Tensor

from ..core.nm import nm_keep, validate_nm

__all__ = ["magnitude_prune"]


def magnitude_prune(weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Keep the ``n`` largest ``|w|`` of every block of ``m`` consecutive columns (ties: the lower column).

    Args:
        weight: ``[O, D]``, ``D % m == 0``.

    Returns:
        ``(pruned weight, keep)``: a new ``[O, D]`` tensor with the pruned weights exactly 0, and the bool mask.
    """
    validate_nm(n, m)
    keep = nm_keep(weight.detach().abs(), n, m)
    return weight.masked_fill(~keep, 0.0), keep
