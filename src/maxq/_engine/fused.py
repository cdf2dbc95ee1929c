"""The MaxQ mask on the CPU with the fused kernels (float32, contiguous): same masks as :mod:`maxq.core.masks`.

The kernels find the exact order statistics of the queries near the previous step's thresholds, which move
little between steps; :class:`FusedState` carries them from one update to the next. Only speed depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import cpu_kernels

__all__ = ["FusedState", "fused_available", "fused_mask_"]

# Guesses further off than this many ranks are resolved by the exact (kthvalue) path instead.
_MAX_OFFSET = 4096


@dataclass
class FusedState:
    """Thresholds of the last mask computation of one layer (speed only)."""

    filter: Tensor | None = None
    kernel: Tensor | None = None
    dense: Tensor | None = None
    filter_width: Tensor | None = None  # search-bracket widths of the kernel
    kernel_width: Tensor | None = None


def fused_available(weight: Tensor, out: Tensor) -> bool:
    """Whether :func:`fused_mask_` applies: CPU float32 tensors and the kernels built (and not disabled)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and out.dtype == torch.float32
        and weight.is_contiguous()
        and out.is_contiguous()
        and cpu_kernels() is not None
    )


def _kth_pair_exact(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    from ..core.queries import kth_pair

    return kth_pair(x, k, 1)


def _query_sets(w: Tensor, axis: int) -> Tensor:
    """``|W|`` as one query set per row: filter rows (``axis=1``) or kernel columns (``axis=0``)."""
    if axis == 1:
        return w.abs().reshape(w.shape[0], -1)
    return w.abs().reshape(-1, w.shape[2] * w.shape[3]).t().contiguous()


def _fused_pair(
    ext, w: Tensor, axis: int, k: int, guess: Tensor | None, count: Tensor, width: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact ``a(k), a(k+1)`` of every query set (``axis`` 1: filter rows, 0: kernel columns), flat, and the
    search-bracket widths to pass back next time."""
    if guess is None:
        lo, hi = _kth_pair_exact(_query_sets(w, axis), k)
        return lo.flatten(), hi.flatten(), None
    if width is not None and width.numel() != guess.numel():
        width = None
    lo, hi, ok, width = ext.kth_select(w, axis, k, guess.flatten(), count, _MAX_OFFSET, width)
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(-1)
        blo, bhi = _kth_pair_exact(_query_sets(w, axis).index_select(0, bad), k)
        lo[bad], hi[bad] = blo.flatten(), bhi.flatten()
    return lo, hi, width


def _fix_tied_cuts(w: Tensor, mask: Tensor, axis: int, k: int, lo: Tensor, hi: Tensor) -> None:
    """Sets whose cut falls inside a run of equal values (``a(k) == a(k+1)``): the kernel gated them with
    ``|w| > a(k)``, dropping every tied entry; by the index rule the lower-index ones among them are kept, each
    with ``Q = sigmoid(0) = 0.5``."""
    tied = (lo == hi).nonzero().flatten()
    if tied.numel() == 0:
        return
    sets = w.abs().reshape(w.shape[0], -1) if axis == 1 else w.abs().reshape(-1, w.shape[2] * w.shape[3]).t()
    flat = mask.view(w.shape[0], -1) if axis == 1 else mask.view(-1, w.shape[2] * w.shape[3]).t()
    for s in tied.tolist():
        values, v = sets[s], lo[s]
        equal = (values == v).nonzero().flatten()
        kept = equal.numel() - (k - int((values < v).sum()))  # equal entries outside the k smallest
        idx = equal[:kept]
        flat[s, idx] += 0.5 * (flat[s, idx] != 0)


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
    """Write the mask of ``w`` into ``out`` with the compiled kernels, updating ``state``'s thresholds."""
    from ..core.masks import dense_blocks
    from ..core.queries import pruned_count

    ops = torch.ops.maxq
    o, i = w.shape[0], w.shape[1]
    kernel = w.numel() // (o * i)
    has_k = soft and w.dim() == 4 and kernel > 1
    gf = state.filter if soft and state.filter is not None and state.filter.numel() == o else None
    gk = state.kernel if has_k and state.kernel is not None and state.kernel.numel() == kernel else None
    total = w.numel() // m
    l1 = torch.empty(o, i // m, kernel) if 0 < dense_count < total else None
    count_f, count_k = ops.nm_pass(
        w, n, m, out, l1, None if gf is None else gf.flatten(), None if gk is None else gk.flatten()
    )
    if dense_count >= total:
        out.fill_(1.0)
    elif l1 is not None:
        dense = dense_blocks(l1.flatten(), dense_count, order, priority)
        out.view(o, i // m, m, kernel).masked_fill_(dense.view(o, i // m, 1, kernel), 1.0)
    if not soft:
        return
    k_f = pruned_count(i * kernel, n, m)
    lof, hif, state.filter_width = _fused_pair(ops, w, 1, k_f, gf, count_f, state.filter_width)
    tf = (lof + hif) / 2
    tk = lok = hik = None
    if has_k:
        k_k = pruned_count(o * i, n, m)
        lok, hik, state.kernel_width = _fused_pair(ops, w, 0, k_k, gk, count_k, state.kernel_width)
        tk = (lok + hik) / 2
    ops.soft_scale_(w, out, tf, lof, tk, lok, tau)
    _fix_tied_cuts(w, out, 1, k_f, lof, hif)
    if has_k:
        _fix_tied_cuts(w, out, 0, k_k, lok, hik)
    state.filter = tf
    state.kernel = tk
