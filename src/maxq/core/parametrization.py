"""The mask as a parametrization of a stock ``nn.Conv2d`` / ``nn.Linear`` weight: ``weight -> weight * Mask``.

Attached with ``torch.nn.utils.parametrize``, so the model keeps its classes, ``module.weight`` stays the
effective (masked) weight, and the trainable tensor lives at ``module.parametrizations.weight.original``.
Folding (:func:`maxq.fold_`) removes it with ``leave_parametrized=True``, keeping the parameter's identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._engine.workspace import Workspace
from .masks import MaskGuess, compute_mask
from .nm import _check_layout

__all__ = ["NMMask"]


class _StraightThrough(torch.autograd.Function):
    """``W * Mask`` forward, identity backward: the gradient w.r.t. ``W`` is the one w.r.t. ``W * Mask``."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class NMMask(nn.Module):
    """Parametrization ``W -> W * Mask`` with the mask of one layer and the state needed to recompute it.

    The mask is recomputed from the current weight at the first training-mode access after it was marked
    stale (by :class:`maxq.Sparsifier` at each training step, every ``update_every`` steps); eval mode uses the
    last mask, frozen. Masks are computed without gradient.

    Args:
        shape: the weight's shape, ``[O, I]`` or ``[O, I, kh, kw]``.
        n, m: the N:M pattern.
        soft: multiply the hard mask by ``1 + Q_f + Q_k`` (MaxQ).
        tau: query temperature.
        order: which blocks stay dense during the ramp.
        straight_through: identity gradient (STE) instead of the masked gradient.
        frozen: compute the mask once and never again (one-shot).
        priority: per-block random scores for ``order="random"``.
        workspace: shared scratch buffers.
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        n: int,
        m: int,
        *,
        soft: bool,
        tau: float,
        order: str,
        straight_through: bool,
        frozen: bool,
        dense_fraction: float = 0.0,
        priority: Tensor | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        super().__init__()
        _check_layout(tuple(shape), m)
        self.n, self.m = n, m
        self.soft, self.tau, self.order = soft, tau, order
        self.straight_through, self.frozen = straight_through, frozen
        self.dense_fraction = dense_fraction
        self.workspace = workspace
        self.fused = True  # use the compiled CPU kernels where they apply (False: pure PyTorch, same result)
        self.stale = True
        self.computed = False
        self._guess = MaskGuess()
        # Not persistent: the model's state_dict holds weights only; masks travel in Sparsifier.state_dict().
        self.register_buffer("mask", torch.ones(shape), persistent=False)
        self.register_buffer("priority", priority, persistent=False)

    def recompute(self, weight: Tensor) -> None:
        """Recompute the mask from ``weight`` now (no gradient, autocast off)."""
        if self.mask.dtype != weight.dtype or self.mask.device != weight.device:
            self.mask = self.mask.to(device=weight.device, dtype=weight.dtype)
        if self._guess.filter is not None and self._guess.filter.device != weight.device:
            self._guess = MaskGuess()
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            _, self._guess = compute_mask(
                weight,
                self.n,
                self.m,
                dense_fraction=self.dense_fraction,
                order=self.order,
                priority=self.priority,
                tau=self.tau,
                soft=self.soft,
                guess=self._guess,
                out=self.mask,
                ws=self.workspace,
                fused=self.fused,
            )
        self.stale = False
        self.computed = True

    def forward(self, weight: Tensor) -> Tensor:
        if not self.computed or (self.stale and self.training and not self.frozen):
            self.recompute(weight)
        if self.straight_through:
            return _StraightThrough.apply(weight, self.mask)
        return weight * self.mask

    def extra_repr(self) -> str:
        return (
            f"{self.n}:{self.m}, soft={self.soft}, tau={self.tau}, dense_fraction={self.dense_fraction:.3g}, "
            f"straight_through={self.straight_through}, frozen={self.frozen}"
        )
