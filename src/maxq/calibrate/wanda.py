"""Wanda (Sun, Liu, Bair & Kolter, *A Simple and Effective Pruning Approach for Large Language Models*, 2023):
prune by ``|W_ij| * ||X_j||``, each output row compared on its own; kept weights are not changed.

The score weighs a weight by the norm of the input feature it multiplies: a small weight on a large activation
can matter more than a large weight on a small one. Here within every block of ``m`` consecutive inputs of one
output (N:M), as in the paper's N:M variant.
"""

from __future__ import annotations

from torch import Tensor

from ..core.nm import nm_keep, validate_nm

__all__ = ["wanda_prune", "wanda_scores"]


def wanda_scores(weight: Tensor, mean_square: Tensor) -> Tensor:
    """``|W_ij| * sqrt(mean_square_j)``: ``weight`` ``[O, D]``, ``mean_square`` ``[D]`` (``||X_j||^2 / T``, see
    [`InputStats`][maxq.calibrate.InputStats]), broadcast along the inputs (columns)."""
    if mean_square.shape != weight.shape[1:]:
        shapes = f"weight {tuple(weight.shape)}, statistics {tuple(mean_square.shape)}"
        raise ValueError(f"one statistic per input column is needed: {shapes}")
    return weight.detach().abs() * mean_square.sqrt().unsqueeze(0)


def wanda_prune(weight: Tensor, mean_square: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Keep the ``n`` highest Wanda scores of every block of ``m`` consecutive columns (ties: the lower column).

    Args:
        weight: ``[O, D]``, ``D % m == 0``.
        mean_square: ``[D]``, the mean square of every input feature over the calibration rows.

    Returns:
        ``(pruned weight, keep)``: a new ``[O, D]`` tensor with the pruned weights exactly 0 (the kept ones
        unchanged), and the bool mask.
    """
    validate_nm(n, m)
    keep = nm_keep(wanda_scores(weight, mean_square), n, m)
    return weight.masked_fill(~keep, 0.0), keep
