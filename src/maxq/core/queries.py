"""Axis queries: the soft masks ``Q_f`` (filter axis) and ``Q_k`` (kernel axis) of MaxQ (SPEC §2).

For a query set ``S`` of ``L`` magnitudes and ``k = floor((M - N) / M * L)``::

    t   = (a(k) + a(k+1)) / 2                  # a(i): i-th smallest of S, 1-indexed
    Q_e = 1[e not among the k smallest of S] * sigmoid((A_e - t) / tau)

so ``Q`` is 0 on the bottom ``(M-N)/M`` of the set and in ``[0.5, 1]`` on the rest. Ties at the cut go the same
way as in the hard mask: the lower index counts as larger.

Query sets are the rows (``dim=1``) or the columns (``dim=0``) of a 2-D view of ``|W|``, so both axes run on the
weight's own memory layout without transposed copies.

Speed: the exact order statistics ``a(k), a(k+1)`` are the only non-elementwise work. Without help they come
from ``kthvalue`` (linear time, but slow on CPU). Given a guess -- the previous step's threshold, which moves
little between steps -- :func:`kth_pair` counts the entries below the guess and picks the few entries nearest to
it with a small ``topk``; every set it cannot prove exact falls back to ``kthvalue``, so results never depend on
the guess, only the time does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._engine.workspace import Workspace, scratch
from .nm import topk_mask

__all__ = ["axis_query", "filter_query", "kernel_query", "kth_pair", "pruned_count"]

# Window of the fast path: at least this many neighbours of the guess ...
_MIN_WINDOW = 8
# ... and the exact path when the guess is so far off that the window would exceed this share of a set.
_MAX_WINDOW_SHARE = 1 / 8
# Float sums count exactly below this; longer sets count in float64.
_EXACT_F32_COUNT = 1 << 24


def pruned_count(length: int, n: int, m: int) -> int:
    """``k = floor((m - n) / m * length)``: how many entries of a query set fall below its threshold."""
    return ((m - n) * length) // m


def _kth_pair_exact(x: Tensor, k: int, dim: int) -> tuple[Tensor, Tensor]:
    if dim == 0:  # kthvalue is far faster along contiguous rows
        lo, hi = _kth_pair_exact(x.t().contiguous(), k, 1)
        return lo.t(), hi.t()
    lo = x.kthvalue(k, dim=dim, keepdim=True).values
    # a(k+1) is a(k) again if more than k entries are <= a(k), else the smallest entry above a(k).
    at_most = x <= lo
    above = x.masked_fill(at_most, float("inf")).amin(dim, keepdim=True)
    hi = torch.where(at_most.sum(dim, keepdim=True) > k, lo, above)
    return lo, hi


def kth_pair(
    x: Tensor, k: int, guess: Tensor | None = None, dim: int = 1, ws: Workspace | None = None
) -> tuple[Tensor, Tensor]:
    """Exact ``k``-th and ``(k+1)``-th smallest value of every set along ``dim`` of a 2-D tensor.

    Args:
        x: ``[R, L]`` (``dim=1``) or ``[L, R]`` (``dim=0``) non-negative floats (magnitudes).
        k: 1-indexed rank, ``1 <= k < L``.
        guess: optional value near the answer per set, shaped like the outputs (e.g. last step's threshold).
            Only speed depends on it.
        dim: the axis the sets run along.
        ws: scratch buffers.

    Returns:
        ``(a_k, a_k1)``, each ``x``'s shape with ``dim`` reduced to size 1.
    """
    length = x.shape[dim]
    if not 1 <= k < length:
        raise ValueError(f"kth_pair needs 1 <= k < L, got k={k}, L={length}")
    if guess is None or x.dtype != torch.float32 or length < 4 * _MIN_WINDOW:
        return _kth_pair_exact(x, k, dim)
    guess = guess.to(torch.float32)
    # For non-negative floats the IEEE bit patterns are monotone int32s: exact, cheap distances to the guess.
    diff = torch.sub(x.view(torch.int32), guess.view(torch.int32), out=scratch(ws, "diff", x.shape, x, torch.int32))
    below_f = torch.lt(diff, 0, out=scratch(ws, "tmp", x.shape, x, torch.float32))
    offset = below_f.sum(dim, keepdim=True, dtype=torch.float64 if length >= _EXACT_F32_COUNT else None) - k
    # offset > 0: the guess sits above a(k+1); < 0: at or below a(k). The `window` entries nearest the guess
    # are a contiguous run of the sorted set: its nb largest entries below the guess (global ranks
    # below-nb+1 .. below), then its smallest ones at or above it.
    window = max(_MIN_WINDOW, 2 * int(offset.abs().max()) + 4)
    if window > length * _MAX_WINDOW_SHARE:
        return _kth_pair_exact(x, k, dim)
    idx = diff.abs_().topk(window, dim=dim, largest=False, sorted=False).indices
    near = x.gather(dim, idx).sort(dim=dim).values
    pos = ((near < guess).sum(dim, keepdim=True) - offset.long() - 1).clamp_(-1, window - 1)
    ok = (pos >= 0) & (pos <= window - 2)  # a(k) and a(k+1) both inside the window
    pos.clamp_(0, window - 2)
    lo, hi = near.gather(dim, pos), near.gather(dim, pos + 1)
    if not bool(ok.all()):
        bad = (~ok).flatten().nonzero().squeeze(-1)
        blo, bhi = _kth_pair_exact(x.index_select(1 - dim, bad), k, dim)
        lo = lo.index_copy(1 - dim, bad, blo)
        hi = hi.index_copy(1 - dim, bad, bhi)
    return lo, hi


def axis_query(
    x: Tensor,
    n: int,
    m: int,
    tau: float,
    guess: Tensor | None = None,
    dim: int = 1,
    out: Tensor | None = None,
    ws: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft query of every set along ``dim`` of the 2-D magnitudes ``x``.

    Args:
        x: ``|W|`` viewed as ``[R, L]`` (sets are rows, ``dim=1``) or ``[L, R]`` (sets are columns, ``dim=0``).
        n, m: the N:M pattern; the query keeps the same density ``n / m``.
        tau: sigmoid temperature, absolute (in units of ``|W|``).
        guess: optional previous thresholds, shaped like the returned ``t`` (speed only).
        out: optional buffer of ``x``'s shape.

    Returns:
        ``(Q, t)``: ``Q`` of ``x``'s shape with values in ``{0} U [0.5, 1]``, and the thresholds ``t``
        (``x``'s shape with ``dim`` reduced to 1).
    """
    length = x.shape[dim]
    k = pruned_count(length, n, m)
    q = out if out is not None else torch.empty_like(x)
    if k == 0:  # a set too small to prune anything: all entries kept, threshold just below the smallest
        t = x.amin(dim, keepdim=True) - tau
        return torch.add(t / -tau, x, alpha=1 / tau, out=q).sigmoid_(), t
    lo, hi = kth_pair(x, k, guess, dim, ws)
    t = (lo + hi) / 2
    torch.add(t / -tau, x, alpha=1 / tau, out=q).sigmoid_()  # sigmoid((x - t) / tau) in one pass
    # With a(k) < a(k+1) the k smallest are exactly the entries <= a(k); a tie at the cut needs the index rule.
    keep = torch.gt(x, lo, out=scratch(ws, "tmp", x.shape, x, q.dtype))
    tied = (lo == hi).flatten()
    if bool(tied.any()):
        sets = tied.nonzero().squeeze(-1)
        fixed = topk_mask(x.index_select(1 - dim, sets).movedim(dim, -1), length - k).movedim(-1, dim)
        keep.index_copy_(1 - dim, sets, fixed.to(keep.dtype))
    return q.mul_(keep), t


def filter_query(
    a: Tensor,
    n: int,
    m: int,
    tau: float,
    guess: Tensor | None = None,
    out: Tensor | None = None,
    ws: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """``Q_f``: one query per output filter (Conv2d: its ``I*kh*kw`` weights; Linear: its row).

    Args:
        a: ``|W|``, ``[O, I]`` or ``[O, I, kh, kw]``, contiguous.
        out: optional buffer of ``a``'s shape.

    Returns:
        ``(Q_f, t)`` with ``Q_f`` of ``a``'s shape and ``t`` ``[O, 1]``.
    """
    x = a.view(a.shape[0], -1)
    q, t = axis_query(x, n, m, tau, guess, 1, None if out is None else out.view(x.shape), ws)
    return q.view(a.shape), t


def kernel_query(
    a: Tensor,
    n: int,
    m: int,
    tau: float,
    guess: Tensor | None = None,
    out: Tensor | None = None,
    ws: Workspace | None = None,
) -> tuple[Tensor, Tensor] | None:
    """``Q_k``: one query per kernel position ``(kh, kw)`` over all ``O*I`` weights at that position.

    Returns ``None`` for Linear weights and 1x1 kernels (``Q_k = 0``), else ``(Q_k, t)`` with ``t`` ``[1, kh*kw]``.
    """
    if a.dim() != 4 or a.shape[2] * a.shape[3] == 1:
        return None
    x = a.view(-1, a.shape[2] * a.shape[3])  # [O*I, kh*kw]: each column is one query set
    q, t = axis_query(x, n, m, tau, guess, 0, None if out is None else out.view(x.shape), ws)
    return q.view(a.shape), t
