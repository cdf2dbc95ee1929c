"""The MaxQ mask on the CPU with the fused kernel (float32): the same masks as `maxq.core.masks`.

The kernel finds the exact order statistics of the queries (and the dense-block cut of the ramp) near the
previous update's thresholds, which move little between steps; `FusedState` carries them from one
update to the next. Only speed depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import cpu_kernels

__all__ = ["FusedState", "fused_available", "fused_mask_"]

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


def fused_available(weight: Tensor, out: Tensor) -> bool:
    """Whether `fused_mask_` applies: CPU float32 tensors and the kernels built (and not disabled)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and out.dtype == torch.float32
        and out.device.type == "cpu"
        and cpu_kernels() is not None
    )


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
    if priority is not None:
        priority = priority.to(torch.float32).contiguous()
    state.fallbacks = torch.ops.maxq.mask_(
        w_c, out_c, state.for_weight(w_c), n, m, soft, tau, dense_count, _ORDERS[order], priority
    )
    if out_c is not out:
        out.copy_(out_c)
