"""The MaxQ mask ``B_t * (1 + Q_f + Q_k)`` and its parts (SPEC §2-3), as pure functions.

``B_t`` is the hard N:M mask with a fraction ``p`` of blocks kept dense (incremental sparsity); ``Q_f`` and
``Q_k`` are the axis queries of :mod:`maxq.queries`. The values are 0 on pruned weights and in ``[1, 3]`` on
kept ones, so the soft terms re-weight survivors but never change which weights survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._engine.kernels import cpu_kernels
from .._engine.workspace import Workspace, scratch
from .nm import _check_layout, block_major, nm_keep_, topk_mask, validate_nm
from .queries import _kth_pair_exact, filter_query, kernel_query, kth_pair, pruned_count

__all__ = ["BLOCK_ORDERS", "MaskGuess", "block_l1", "compute_mask", "dense_blocks", "hard_mask", "maxq_mask"]

#: which blocks stay dense during the ramp: the smallest-L1 ones (paper default), the largest, or random ones.
BLOCK_ORDERS = ("smallest", "largest", "random")


def block_l1(a: Tensor, m: int) -> Tensor:
    """L1 norm of every block of magnitudes ``a``: ``[G]`` in native block order ``(o, i // m, kh, kw)``."""
    return _channel_sum(block_major(a, m)).flatten()


def _channel_sum(blocks: Tensor) -> Tensor:
    """Sum of a block-major ``[m, ...]`` tensor over its channels, in channel order (as the fused kernel)."""
    total = blocks[0].clone()
    for x in range(1, blocks.shape[0]):
        total += blocks[x]
    return total


def dense_blocks(
    l1: Tensor,
    fraction: float,
    order: str = "smallest",
    priority: Tensor | None = None,
    guess: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Pick ``floor(fraction * G)`` blocks to keep dense.

    Args:
        l1: ``[G]`` block L1 norms.
        fraction: ``p`` in ``[0, 1]``.
        order: ``"smallest"`` (paper default: high-norm blocks become N:M first), ``"largest"`` or ``"random"``.
        priority: ``[G]`` non-negative random scores, required for ``"random"`` (keep it fixed across steps).
        guess: the second return value of the previous call (speed only).

    Returns:
        ``(dense, cut)``: bool ``[G]`` (ties go to the lower block index) and the cut value to pass back as
        ``guess`` next time.
    """
    if order not in BLOCK_ORDERS:
        raise ValueError(f"unknown block order {order!r}; choose one of {BLOCK_ORDERS}")
    total = l1.numel()
    count = int(fraction * total)
    if count <= 0 or count >= total:
        return torch.full_like(l1, count > 0, dtype=torch.bool), guess
    if order == "random":
        if priority is None or priority.shape != l1.shape:
            raise ValueError("order='random' needs a priority tensor with one score per block")
        l1 = priority
    scores = l1.view(1, -1)
    if order == "smallest":
        # dense = the `count` smallest: everything <= a(count) when a(count) < a(count+1)
        lo, hi = kth_pair(scores, count, guess)
        if bool(lo < hi):
            return (l1 <= lo.view(())), lo
        return topk_mask(-l1, count), lo
    # dense = the `count` largest: everything above the (total - count) smallest
    lo, hi = kth_pair(scores, total - count, guess)
    if bool(lo < hi):
        return (l1 > lo.view(())), lo
    return topk_mask(l1, count), lo


def hard_mask(
    weight: Tensor,
    n: int,
    m: int,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
) -> Tensor:
    """``B_t``: bool N:M keep-mask of ``weight`` with ``floor(dense_fraction * G)`` whole blocks kept dense."""
    validate_nm(n, m)
    _check_layout(weight.shape, m)
    with torch.no_grad():
        a = weight.detach().abs()
        dense = dense_blocks(block_l1(a, m), dense_fraction, order, priority)[0] if dense_fraction > 0 else None
        return nm_keep_(torch.empty_like(a, dtype=torch.bool), a, n, m, dense)


@dataclass
class MaskGuess:
    """Thresholds of the last query computation; passing them back only speeds up the next one."""

    filter: Tensor | None = None
    kernel: Tensor | None = None
    dense: Tensor | None = None
    filter_width: Tensor | None = None  # search-bracket widths of the fused kernel
    kernel_width: Tensor | None = None


def compute_mask(
    weight: Tensor,
    n: int,
    m: int,
    *,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
    tau: float = 0.01,
    soft: bool = True,
    guess: MaskGuess | None = None,
    out: Tensor | None = None,
    ws: Workspace | None = None,
    fused: bool = True,
) -> tuple[Tensor, MaskGuess]:
    """:func:`maxq_mask` for the training hot path: writes into ``out``, borrows temporaries from ``ws`` and
    returns the thresholds to pass back as the next call's ``guess``. ``fused`` allows the compiled CPU kernels
    (:mod:`maxq.kernels`) where they apply."""
    with torch.no_grad():
        w = weight.detach()
        guess = guess or MaskGuess()
        mask = out if out is not None else torch.empty_like(w)
        spec = _Spec(n, m, dense_fraction, order, priority, tau, soft)
        if fused and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() and mask.is_contiguous():
            ext = cpu_kernels()
            if ext is not None:
                return mask, _compute_fused(ext, w, spec, guess, mask, ws)
        return mask, _compute_eager(w, spec, guess, mask, ws)


@dataclass(frozen=True)
class _Spec:
    """What to compute: the arguments of :func:`compute_mask` that are not state."""

    n: int
    m: int
    dense_fraction: float
    order: str
    priority: Tensor | None
    tau: float
    soft: bool


def _compute_eager(w: Tensor, spec: _Spec, guess: MaskGuess, mask: Tensor, ws: Workspace | None) -> MaskGuess:
    n, m, tau = spec.n, spec.m, spec.tau
    a = scratch(ws, "abs", w.shape, w, torch.float32)
    torch.abs(w, out=a) if w.dtype == torch.float32 else a.copy_(w.abs())
    new_guess = MaskGuess()
    blocks = block_major(a, m, ws)
    dense = None
    if spec.dense_fraction > 0:
        l1 = _channel_sum(blocks).flatten()  # native block order, as block_l1
        dense, new_guess.dense = dense_blocks(l1, spec.dense_fraction, spec.order, spec.priority, guess.dense)
    keep = mask if mask.dtype == torch.float32 else scratch(ws, "keep", w.shape, a)
    nm_keep_(keep, a, n, m, dense, ws, blocks)
    if spec.soft:
        q, new_guess.filter = filter_query(a, n, m, tau, guess.filter, scratch(ws, "qf", a.shape, a), ws)
        kq = kernel_query(a, n, m, tau, guess.kernel, scratch(ws, "qk", a.shape, a), ws)
        if kq is not None:
            q.add_(kq[0])
            new_guess.kernel = kq[1]
        keep.addcmul_(keep, q)  # B * (1 + Q_f + Q_k)
    if keep is not mask:
        mask.copy_(keep)
    return new_guess


# Guesses further off than this many ranks are resolved by the exact (kthvalue) path instead.
_MAX_OFFSET = 4096


def _query_sets(w: Tensor, axis: int) -> Tensor:
    """``|W|`` as one query set per row: filter rows (``axis=1``) or kernel columns (``axis=0``)."""
    if axis == 1:
        return w.abs().reshape(w.shape[0], -1)
    return w.abs().reshape(-1, w.shape[2] * w.shape[3]).t()


def _fused_pair(
    ext, w: Tensor, axis: int, k: int, guess: Tensor | None, count: Tensor, width: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact ``a(k), a(k+1)`` of every query set (``axis`` 1: filter rows, 0: kernel columns), flat, and the
    search-bracket widths to pass back next time."""
    if guess is None:
        lo, hi = _kth_pair_exact(_query_sets(w, axis), k, 1)
        return lo.flatten(), hi.flatten(), None
    if width is not None and width.numel() != guess.numel():
        width = None
    lo, hi, ok, width = ext.kth_select(w, axis, k, guess.flatten(), count, _MAX_OFFSET, width)
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(-1)
        blo, bhi = _kth_pair_exact(_query_sets(w, axis).index_select(0, bad), k, 1)
        lo[bad], hi[bad] = blo.flatten(), bhi.flatten()
    return lo, hi, width


def _fix_tied_cuts(w: Tensor, mask: Tensor, axis: int, k: int, lo: Tensor, hi: Tensor) -> None:
    """Sets whose cut falls inside a run of equal values (``a(k) == a(k+1)``): the kernel gated them with
    ``|w| > a(k)``, dropping every tied entry; by the index rule the lower-index ones among them are kept, each
    with ``Q = sigmoid(0) = 0.5``."""
    tied = (lo == hi).nonzero().flatten()
    if tied.numel() == 0:
        return
    sets = _query_sets(w, axis)
    flat = mask.view(w.shape[0], -1) if axis == 1 else mask.view(-1, w.shape[2] * w.shape[3]).t()
    for s in tied.tolist():
        values, v = sets[s], lo[s]
        equal = (values == v).nonzero().flatten()
        kept = equal.numel() - (k - int((values < v).sum()))  # equal entries outside the k smallest
        idx = equal[:kept]
        flat[s, idx] += 0.5 * (flat[s, idx] != 0)


def _compute_fused(ext, w: Tensor, spec: _Spec, guess: MaskGuess, mask: Tensor, ws: Workspace | None) -> MaskGuess:
    """The mask with the compiled kernels (see :mod:`maxq.kernels`)."""
    n, m, soft = spec.n, spec.m, spec.soft
    o, i = w.shape[0], w.shape[1]
    kernel = w.numel() // (o * i)
    has_k = soft and w.dim() == 4 and kernel > 1
    gf = guess.filter if soft and guess.filter is not None and guess.filter.numel() == o else None
    gk = guess.kernel if has_k and guess.kernel is not None and guess.kernel.numel() == kernel else None
    new_guess = MaskGuess()
    l1 = scratch(ws, "l1", (o, i // m, kernel), w) if spec.dense_fraction > 0 else None
    count_f, count_k = ext.nm_pass(
        w, n, m, mask, l1, None if gf is None else gf.flatten(), None if gk is None else gk.flatten()
    )
    if l1 is not None:
        dense, new_guess.dense = dense_blocks(l1.flatten(), spec.dense_fraction, spec.order, spec.priority, guess.dense)
        mask.view(o, i // m, m, kernel).masked_fill_(dense.view(o, i // m, 1, kernel), 1.0)
    if not soft:
        return new_guess
    k_f = pruned_count(i * kernel, n, m)
    lof, hif, new_guess.filter_width = _fused_pair(ext, w, 1, k_f, gf, count_f, guess.filter_width)
    tf = (lof + hif) / 2
    tk = lok = hik = None
    if has_k:
        k_k = pruned_count(o * i, n, m)
        lok, hik, new_guess.kernel_width = _fused_pair(ext, w, 0, k_k, gk, count_k, guess.kernel_width)
        tk = (lok + hik) / 2
    ext.soft_scale_(w, mask, tf, lof, tk, lok, spec.tau)
    _fix_tied_cuts(w, mask, 1, k_f, lof, hif)
    if has_k:
        _fix_tied_cuts(w, mask, 0, k_k, lok, hik)
    new_guess.filter = tf.view(o, 1)
    new_guess.kernel = None if tk is None else tk.view(1, kernel)
    return new_guess


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
) -> Tensor:
    """MaxQ mask ``B_t * (1 + Q_f + Q_k)`` of a Linear ``[O, I]`` or Conv2d ``[O, I, kh, kw]`` weight.

    Args:
        n, m: keep ``n`` of every ``m`` along input channels.
        dense_fraction: ``p``, fraction of blocks kept dense (incremental sparsity).
        order: which blocks stay dense, see :func:`dense_blocks`.
        priority: per-block random scores for ``order="random"``.
        tau: query temperature (absolute, in units of ``|W|``); paper default 0.01.
        soft: include the queries; ``False`` gives the hard mask ``B_t`` as 0/1 floats.

    Returns:
        float mask of ``weight``'s shape and dtype: 0 on pruned weights, in ``[1, 3]`` on kept ones.
    """
    validate_nm(n, m)
    _check_layout(weight.shape, m)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return compute_mask(
        weight, n, m, dense_fraction=dense_fraction, order=order, priority=priority, tau=tau, soft=soft
    )[0]
