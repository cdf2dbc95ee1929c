"""Running statistics of one layer's input columns over the calibration batches (``X`` as ``[T, D]``, see
`maxq.calibrate.columns`): what Wanda and SparseGPT read.

* Wanda: the mean square of every input feature, ``||X_j||^2 / T`` (``[D]``); its square root is the activation
  norm of the paper up to a constant, which does not change any per-row comparison.
* SparseGPT: the Hessian of the layer's squared error, ``H = 2 X^T X / T`` (``[D, D]``).

Sums are accumulated in float32 (float64 for a float64 model) on the layer's device with in-place ops (no host
synchronisation); the token count ``T`` comes from shapes, which the host knows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["InputStats"]


class InputStats:
    """Sums over every calibration row seen so far: the count, ``sum_t x_tj^2`` and (``hessian=True``) ``X^T X``.

    Args:
        columns: ``D``, the layer's input columns.
        device: where the sums live (the layer's device).
        hessian: also accumulate ``X^T X`` (``D x D`` floats: one layer's worth of memory).
        dtype: of the sums: float32, or float64 for a float64 model.
    """

    def __init__(
        self,
        columns: int,
        device: torch.device | str | None = None,
        *,
        hessian: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.columns = columns
        self.rows = 0
        self.square_sum = torch.zeros(columns, dtype=dtype, device=device)
        self.gram = torch.zeros(columns, columns, dtype=dtype, device=device) if hessian else None

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` (``[T, D]``, any floating dtype)."""
        if x.dim() != 2 or x.shape[1] != self.columns:
            raise ValueError(f"expected input columns of shape [T, {self.columns}], got {tuple(x.shape)}")
        x = x.detach().to(self.square_sum.dtype)
        self.rows += x.shape[0]
        self.square_sum.add_(x.square().sum(0))
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)

    def mean_square(self) -> Tensor:
        """``||X_j||^2 / T`` per input column, ``[D]`` (Wanda's statistic)."""
        return self.square_sum / max(self.rows, 1)

    def hessian(self) -> Tensor:
        """``2 X^T X / T``, ``[D, D]`` (SparseGPT's); needs ``hessian=True``."""
        if self.gram is None:
            raise RuntimeError("these statistics were collected without hessian=True")
        return self.gram * (2.0 / max(self.rows, 1))
