"""The MaxQ mask ``B_t * (1 + Q_f + Q_k)`` and its parts, as pure functions ``weight -> mask``.

``B_t`` is the hard N:M mask with a fraction ``p`` of blocks kept dense (incremental sparsity); ``Q_f`` and
``Q_k`` are the axis queries of `maxq.core.queries`. The values are 0 on pruned weights and in ``[1, 3]``
on kept ones, so the soft terms re-weight survivors but never change which weights survive.

One definition, two implementations with the same results (the same surviving weights, the same thresholds,
values equal to float rounding): the code here, built from ops that never synchronise with the host (it runs
on any device and under ``torch.compile``), and the fused CPU kernels of the private engine, used for float32
CPU weights. `compute_mask_` picks one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._engine.fused import FusedState, fused_available, fused_mask_
from .nm import _check_layout, block_major, nm_keep, topk_mask, validate_nm
from .queries import filter_query, kernel_query

__all__ = [
    "BLOCK_ORDERS",
    "SOFT_WARMUPS",
    "block_l1",
    "compute_mask_",
    "dense_blocks",
    "dense_count",
    "hard_mask",
    "maxq_mask",
]

#: which blocks stay dense during the ramp: the smallest-L1 ones (paper default), the largest, or random ones.
BLOCK_ORDERS = ("smallest", "largest", "random")

#: how the soft factor meets a trained model (our addition, METHOD.md §8): as the paper (``none``), phased in with
#: the ramp (``ramp``), or each layer's kept values rescaled to a mean of 1 (``normalize``).
SOFT_WARMUPS = ("none", "ramp", "normalize")


def dense_count(fraction: float, blocks: int) -> int:
    """``floor(p * G)``: how many of ``G`` blocks a dense fraction ``p`` keeps dense."""
    return int(fraction * blocks)


def block_l1(a: Tensor, m: int) -> Tensor:
    """L1 norm of every block of magnitudes ``a``: ``[G]`` in native block order ``(o, i // m, kh, kw)``.

    Summed channel by channel, in channel order, on every device (and in the fused kernel), so that the same
    weights give bit-identical norms -- and the same dense blocks -- everywhere.
    """
    blocks = block_major(a, m)
    total = blocks[0].clone()
    for x in range(1, m):
        total += blocks[x]
    return total.flatten()


def dense_blocks(l1: Tensor, count: int, order: str = "smallest", priority: Tensor | None = None) -> Tensor:
    """Pick ``count`` blocks to keep dense (ties go to the lower block index).

    Args:
        l1: ``[G]`` block L1 norms.
        count: how many (see `dense_count`).
        order: ``"smallest"`` L1 (paper default: high-norm blocks become N:M first), ``"largest"`` or ``"random"``.
        priority: ``[G]`` random scores, required for ``"random"`` (keep it fixed across steps).

    Returns:
        bool ``[G]`` with exactly ``min(max(count, 0), G)`` True.
    """
    if order not in BLOCK_ORDERS:
        raise ValueError(f"unknown block order {order!r}; choose one of {BLOCK_ORDERS}")
    if order == "random":
        if priority is None or priority.shape != l1.shape:
            raise ValueError("order='random' needs a priority tensor with one score per block")
        return topk_mask(priority.to(l1.device), count)
    # "smallest": the count largest of -l1 (negation is exact), ties to the lower index either way.
    return topk_mask(-l1 if order == "smallest" else l1, count)


def _check(weight: Tensor, n: int, m: int, tau: float, dense_fraction: float, order: str) -> None:
    validate_nm(n, m)
    _check_layout(weight.shape, m)
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (it divides |W| - t), got {tau}")
    if not 0.0 <= dense_fraction <= 1.0:
        raise ValueError(f"dense_fraction must be in [0, 1], got {dense_fraction}")
    if order not in BLOCK_ORDERS:
        raise ValueError(f"unknown block order {order!r}; choose one of {BLOCK_ORDERS}")


def hard_mask(
    weight: Tensor,
    n: int,
    m: int,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
) -> Tensor:
    """``B_t``: bool N:M keep-mask of ``weight`` with ``floor(dense_fraction * G)`` whole blocks kept dense.

    Args:
        weight: ``[O, I]`` or ``[O, I, kh, kw]`` floating tensor; ``G = weight.numel() / m`` blocks.
        n: weights kept per block (``1 <= n < m``).
        m: block size along input channels; must divide the input size.
        dense_fraction: ``p`` in ``[0, 1]``, the share of blocks kept whole (incremental sparsity).
        order: which blocks stay dense: ``smallest`` L1 (the paper), ``largest`` or ``random``.
        priority: ``[G]`` per-block scores for ``order="random"``.

    Returns:
        bool tensor of ``weight``'s shape.
    """
    _check(weight, n, m, 0.01, dense_fraction, order)
    with torch.no_grad():
        a = weight.detach().abs()
        count = dense_count(dense_fraction, a.numel() // m)
        dense = dense_blocks(block_l1(a, m), count, order, priority) if count > 0 else None
        return nm_keep(a, n, m, dense)


def maxq_mask(
    weight: Tensor,
    n: int,
    m: int,
    *,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
    tau: float = 0.01,
    soft: bool = True,
    strength: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """MaxQ mask ``B_t * (1 + Q_f + Q_k)`` of a Linear ``[O, I]`` or Conv2d ``[O, I, kh, kw]`` weight.

    Args:
        weight: ``[O, I]`` or ``[O, I, kh, kw]`` floating tensor (any device).
        n: weights kept per block (``1 <= n < m``).
        m: block size along input channels; must divide the input size.
        dense_fraction: ``p``, fraction of blocks kept dense (incremental sparsity).
        order: which blocks stay dense, see `dense_blocks`.
        priority: per-block random scores for ``order="random"``.
        tau: query temperature (absolute, in units of ``|W|``); paper default 0.01.
        soft: include the queries; ``False`` gives the hard mask ``B_t`` as 0/1 floats.
        strength: the soft factor's weight ``a`` in ``[0, 1]`` (our addition, see `soften_`).
        normalize: rescale each layer's kept mask values to a mean of 1 (our addition, see `soften_`).

    Returns:
        float mask of ``weight``'s shape and dtype: 0 on pruned weights, in ``[1, 3]`` on kept ones (the paper's
        mask; ``strength`` < 1 gives ``[1, 1 + 2 * strength]``, ``normalize`` a mean of 1 over kept ones).

    Raises:
        ValueError: an invalid pattern, a shape whose input size ``m`` does not divide, ``tau <= 0``,
            ``dense_fraction`` outside ``[0, 1]``, ``strength`` outside ``[0, 1]`` or an unknown ``order``.
    """
    _check(weight, n, m, tau, dense_fraction, order)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    compute_mask_(
        out,
        weight,
        n,
        m,
        dense_fraction=dense_fraction,
        order=order,
        priority=priority,
        tau=tau,
        soft=soft,
        strength=strength,
        normalize=normalize,
    )
    return out


def soften_(mask: Tensor, strength: float = 1.0, normalize: bool = False) -> Tensor:
    """The soft factor's warm-up, in place on a mask ``B * (1 + Q_f + Q_k)`` (our addition, METHOD.md §8).

    ``strength`` ``a``: ``Mask = a * Mask + (1 - a) * B`` with ``B = [Mask != 0]`` (kept values ``1 + a * Q``);
    ``a = 0`` is the hard mask, ``a = 1`` leaves the mask alone. ``normalize``: then divide by the mean over kept
    weights, so the layer's kept values average 1. Pure tensor ops (no host sync, no data-dependent branch);
    never changes which weights are kept. Returns ``mask``.
    """
    if strength != 1.0:
        kept = mask.ne(0).to(mask.dtype)
        mask.sub_(kept).mul_(strength).add_(kept)  # B + a * (Mask - B)
    if normalize:
        total = mask.sum(dtype=torch.float32)
        count = mask.ne(0).sum().clamp_min(1).to(torch.float32)
        mask.div_((total / count).clamp_min(torch.finfo(torch.float32).tiny).to(mask.dtype))
    return mask


def compute_mask_(
    out: Tensor,
    weight: Tensor,
    n: int,
    m: int,
    *,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
    tau: float = 0.01,
    soft: bool = True,
    strength: float = 1.0,
    normalize: bool = False,
    state: FusedState | None = None,
    fused: bool = True,
) -> Tensor:
    """Write the MaxQ mask of ``weight`` into ``out`` (any dtype, device and memory format); no gradient.

    Arguments as [`maxq_mask`][maxq.maxq_mask] (not validated here: this is the training hot path). ``state`` carries
    the fused CPU kernels' thresholds from one call to the next (speed only); ``fused=False`` forces the
    device-agnostic path. The soft factor's warm-up (``strength``, ``normalize``: `soften_`) is applied to
    the result of either path. Returns ``out``.
    """
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        w = weight.detach()
        count = dense_count(dense_fraction, w.numel() // m)
        if fused and fused_available(w, out):
            fused_mask_(
                out,
                w,
                n,
                m,
                dense_count=count,
                order=order,
                priority=priority,
                tau=tau,
                soft=soft,
                state=state if state is not None else FusedState(),
            )
            return soften_(out, strength, normalize) if soft else out
        a = w.abs().float()
        dense = dense_blocks(block_l1(a, m), count, order, priority) if count > 0 else None
        mask = nm_keep(a, n, m, dense).to(torch.float32)
        if soft:
            q = filter_query(a, n, m, tau)[0]
            kq = kernel_query(a, n, m, tau)
            if kq is not None:
                q = q + kq[0]
            mask = soften_(mask * (1 + q), strength, normalize)  # B * (1 + Q_f + Q_k), warmed up
        return out.copy_(mask)
