"""The mask as a parametrization of a stock ``nn.Conv2d`` / ``nn.Linear`` / HF ``Conv1D`` weight: ``W -> W * mask``.

Attached with ``torch.nn.utils.parametrize``, so the model keeps its classes, ``module.weight`` stays the
effective (masked) weight, and the trainable tensor lives at ``module.parametrizations.weight.original``.
Folding ([`maxq.fold_`][maxq.fold_]) removes it with ``leave_parametrized=True``, keeping the parameter's identity.

The forward is ``W * mask`` and nothing else: no Python state is read and no mask is computed in it, so
``torch.compile`` traces it without graph breaks. The mask is a buffer that [`maxq.Sparsifier`][maxq.Sparsifier]
rewrites in place, outside the forward, when it updates the masks (``Sparsifier.step()``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .nm import _check_layout, oi_view

__all__ = ["NMMask"]


class _StraightThrough(torch.autograd.Function):
    """``W * mask`` forward, identity backward: the gradient w.r.t. ``W`` is the one w.r.t. ``W * mask``."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class NMMask(nn.Module):
    """Parametrization ``W -> W * mask`` of one layer.

    Args:
        shape: the weight's stored shape, ``[O, I]``, ``[O, I, kh, kw]`` or (``input_axis=0``) ``[I, O]``.
        n, m: the layer's N:M pattern (for reports and checks).
        input_axis: the axis of the stored weight holding the inputs (`maxq.core.layers.input_axis`).
        straight_through: identity gradient (STE: pruned weights keep learning) instead of the masked gradient.

    The ``mask`` buffer is 0 on pruned weights and ``>= 1`` on kept ones. It is not persistent: the model's
    ``state_dict`` holds weights only; masks travel in ``Sparsifier.state_dict()``.
    """

    def __init__(
        self, shape: torch.Size | tuple[int, ...], n: int, m: int, *, straight_through: bool, input_axis: int = 1
    ) -> None:
        super().__init__()
        _check_layout(tuple(oi_view(torch.empty(shape, device="meta"), input_axis).shape), m)
        self.n, self.m = n, m
        self.input_axis = input_axis
        self.straight_through = straight_through
        self.register_buffer("mask", torch.ones(shape), persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        if self.straight_through:
            return _StraightThrough.apply(weight, self.mask)
        return weight * self.mask

    def extra_repr(self) -> str:
        axis = ", input_axis=0" if self.input_axis == 0 else ""
        return f"{self.n}:{self.m}, straight_through={self.straight_through}{axis}"

    def oi_mask(self) -> Tensor:
        """The mask as ``[O, I(, kh, kw)]`` (a view: `maxq.core.nm.oi_view`)."""
        return oi_view(self.mask, self.input_axis)
