"""The MaxQ mask on the CPU with the fused kernel (float32): the same masks as `maxq.core.masks`.

The kernel finds the exact order statistics of the queries (and the dense-block cut of the ramp) near the
previous update's thresholds, which move little between steps; `FusedState` carries them from one
update to the next. Only speed depends on it.

Besides the float mask (``fused_mask_``) it writes a layer's lean mask state (``fused_state_``: bit planes and
thresholds, see [`maxq.core.masks.compute_state_`][maxq.core.masks.compute_state_]) and recomputes the mask, or
``W * mask``, from that state (``fused_apply_``) with the float operations of the mask writer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import cpu_kernels

__all__ = ["FusedState", "fused_apply_", "fused_available", "fused_mask_", "fused_state_"]

_ORDERS = {"smallest": 0, "largest": 1, "random": 2}


@dataclass
class FusedState:
    """One layer's thresholds from its last update: ``[2*O + 2*K + 2]`` floats (guess and bracket width per filter
    set, per kernel set, and for the dense-block cut); NaN = no guess. Speed only.

    ``fallbacks`` counts the sets the kernel had to solve without the guess (filter, kernel, dense cut), for tests.
    """

    tensor: Tensor | None = None
    fallbacks: Tensor | None = None

    def for_weight(self, weight: Tensor) -> Tensor:
        o, i = weight.shape[0], weight.shape[1]
        k = weight.numel() // (o * i)
        size = 2 * o + 2 * k + 2
        if self.tensor is None or self.tensor.numel() != size:
            self.tensor = torch.full((size,), float("nan"))
        return self.tensor

    @property
    def nbytes(self) -> int:
        """Bytes held (for the memory accounting of [`maxq.Sparsifier.mask_bytes`][maxq.Sparsifier.mask_bytes])."""
        return sum(t.numel() * t.element_size() for t in (self.tensor, self.fallbacks) if t is not None)


def fused_available(weight: Tensor, out: Tensor | None = None) -> bool:
    """Whether the fused kernels apply: CPU float32 tensors and the kernels built (and not disabled)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and (out is None or (out.dtype == torch.float32 and out.device.type == "cpu"))
        and cpu_kernels() is not None
    )


def _priority(priority: Tensor | None) -> Tensor | None:
    return None if priority is None else priority.to(torch.float32).contiguous()


def fused_mask_(
    out: Tensor,
    w: Tensor,
    n: int,
    m: int,
    *,
    dense_count: int,
    order: str,
    priority: Tensor | None,
    tau: float,
    soft: bool,
    state: FusedState,
) -> None:
    """Write the mask of ``w`` into ``out`` with the compiled kernel, updating ``state``'s thresholds. Tensors in
    another memory format (``channels_last``) go through contiguous copies."""
    w_c = w.contiguous()
    out_c = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    state.fallbacks = torch.ops.maxq.mask_(
        w_c, out_c, state.for_weight(w_c), n, m, soft, tau, dense_count, _ORDERS[order], _priority(priority), None, None
    )
    if out_c is not out:
        out.copy_(out_c)


def fused_state_(
    planes: Tensor,
    thresholds: Tensor | None,
    w: Tensor,
    n: int,
    m: int,
    *,
    dense_count: int,
    order: str,
    priority: Tensor | None,
    tau: float,
    soft: bool,
    state: FusedState,
) -> None:
    """Write the mask state of ``w`` (an ``[O, I(, kh, kw)]`` view) into ``planes`` (uint8 ``[P, O, ceil(L / 8)]``)
    and ``thresholds`` (float32 ``[2*O + 2*K]``, soft masks only), updating ``state``'s guesses."""
    state.fallbacks = torch.ops.maxq.mask_(
        w.contiguous(),
        None,
        state.for_weight(w),
        n,
        m,
        soft,
        tau,
        dense_count,
        _ORDERS[order],
        _priority(priority),
        planes,
        thresholds if soft else None,
    )


def fused_apply_(
    out: Tensor,
    w: Tensor,
    planes: Tensor,
    thresholds: Tensor | None,
    *,
    n: int,
    m: int,
    soft: bool,
    tau: float,
    weighted: bool,
) -> Tensor:
    """``out`` = the mask (``weighted=False``) or ``w * mask`` of ``w`` (N:M pattern ``n``:``m``) from its state; ``w``
    and ``out`` are float32 CPU ``[O, I(, kh, kw)]`` views with the same strides. Returns ``out``."""
    thr = thresholds if soft else None
    # The custom op where the compiler traces, or a tensor subclass stands in for the data (PyTorch 2.4's dynamo runs
    # a parametrized module's forward on fake tensors without saying it compiles): its fake kernel takes those.
    if torch.compiler.is_compiling() or type(w) is not Tensor or type(out) is not Tensor:
        torch.ops.maxq.apply_(w, planes, thr, soft, tau, 1 if weighted else 0, out, n, m)
    else:  # the kernel itself: the custom op's dispatch costs ten times the kernel on a small layer
        cpu_kernels().apply_(w, planes, thr, soft, tau, 1 if weighted else 0, out, n, m)
    return out
