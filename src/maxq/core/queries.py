"""Axis queries: the soft masks ``Q_f`` (filter axis) and ``Q_k`` (kernel axis) of MaxQ, as pure functions.

For a query set ``S`` of ``L`` magnitudes and ``k = floor((M - N) / M * L)``:

```text
t   = (a(k) + a(k+1)) / 2                  # a(i): i-th smallest of S, 1-indexed
Q_e = 1[e not among the k smallest of S] * sigmoid((A_e - t) / tau)
```

so ``Q`` is 0 on the bottom ``(M-N)/M`` of the set and in ``[0.5, 1]`` on the rest. Ties at the cut go the same
way as in the hard mask: the lower index counts as larger.

Query sets are the rows (``dim=1``) or the columns (``dim=0``) of a 2-D view of ``|W|``. Everything here is
built from ops that never wait for the device (``kthvalue``, reductions, elementwise), so the same
code runs on CPU and GPU and can be captured by ``torch.compile`` or CUDA graphs. The fused CPU kernels
(``maxq._engine``) compute the same values faster on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .nm import key_value, order_keys
from .sharding import Span, global_kth, global_min

__all__ = ["axis_query", "axis_soft", "axis_threshold", "filter_query", "kernel_query", "kth_pair", "pruned_count"]


def pruned_count(length: int, n: int, m: int) -> int:
    """``k = floor((m - n) / m * length)``: how many entries of a query set fall below its threshold."""
    return ((m - n) * length) // m


def kth_pair(x: Tensor, k: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Exact ``k``-th and ``(k+1)``-th smallest value of every set along ``dim`` of a 2-D tensor.

    Args:
        x: ``[R, L]`` (``dim=1``) or ``[L, R]`` (``dim=0``) floats.
        k: 1-indexed rank, ``1 <= k < L``.

    Returns:
        ``(a_k, a_k1)``, each ``x``'s shape with ``dim`` reduced to size 1.
    """
    length = x.shape[dim]
    if not 1 <= k < length:
        raise ValueError(f"kth_pair needs 1 <= k < L, got k={k}, L={length}")
    if dim == 0:  # kthvalue is far faster along contiguous rows
        lo, hi = kth_pair(x.t().contiguous(), k, 1)
        return lo.t(), hi.t()
    lo = x.kthvalue(k, dim=dim, keepdim=True).values
    # a(k+1) is a(k) again if more than k entries are <= a(k), else the smallest entry above a(k).
    at_most = x <= lo
    above = x.masked_fill(at_most, float("inf")).amin(dim, keepdim=True)
    hi = torch.where(at_most.sum(dim, keepdim=True) > k, lo, above)
    return lo, hi


def axis_threshold(
    x: Tensor, n: int, m: int, tau: float, dim: int = 1, span: Span | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The hard part of the query of every set along ``dim`` of the 2-D magnitudes ``x``: which entries it keeps and
    where its sigmoid is centred (what a mask's state stores; `axis_soft` turns it into ``Q``).

    Args:
        x: ``|W|`` viewed as ``[R, L]`` (sets are rows, ``dim=1``) or ``[L, R]`` (sets are columns, ``dim=0``).
        n, m: the N:M pattern; the query keeps the same density ``n / m``.
        tau: sigmoid temperature (only for a set too small to prune anything).
        span: the sets are spread over ranks and ``x`` holds this rank's entries of each
            ([`maxq.core.sharding.Span`][maxq.core.sharding.Span]); the order statistics are then collectives.

    Returns:
        ``(t, cut, keep)``: the thresholds ``t = (a(k) + a(k+1)) / 2`` and ``cut = a(k)`` (``x``'s shape with ``dim``
        reduced to 1), and bool ``keep`` of ``x``'s shape: not among the ``k`` smallest of its set (ties: the lower
        index counts as larger).
    """
    sharded = span is not None and span.group is not None
    k = pruned_count(span.total if sharded else x.shape[dim], n, m)
    if k == 0:  # a set too small to prune anything: all entries kept, threshold just below the smallest
        low = x.amin(dim, keepdim=True)
        t = (global_min(low, span.group) if sharded else low) - tau
        return t, t, torch.ones_like(x, dtype=torch.bool)
    if dim == 0:  # selections are far faster along contiguous rows
        t, cut, keep = axis_threshold(x.t().contiguous(), n, m, tau, 1, span)
        return t.t(), cut.t(), keep.t()
    # Unique keys (value, then index; the lower index counts as larger): the k smallest are the keys up to the
    # k-th smallest one, ties included, with no tie handling.
    if sharded:
        keys = order_keys(x, 1, span.offset, span.total)
        kth = global_kth(keys, k, span.group)
    else:
        keys = order_keys(x, 1)
        kth = keys.kthvalue(k, dim=1, keepdim=True).values
    keep = keys > kth
    nxt = keys.masked_fill(~keep, torch.iinfo(torch.int64).max).amin(1, keepdim=True)
    if sharded:
        nxt = global_min(nxt, span.group)
    cut = key_value(kth)
    t = (cut + key_value(nxt)) / 2  # (a(k) + a(k+1)) / 2
    return t, cut, keep


def axis_soft(x: Tensor, t: Tensor, keep: Tensor, tau: float, dim: int = 1) -> Tensor:
    """``Q = keep * sigmoid((x - t) / tau)`` of every set along ``dim`` (``t``, ``keep`` from `axis_threshold`).

    The sigmoid is evaluated on a contiguous copy with the sets along rows, so its values do not depend on the
    layout ``x`` comes in (CPU kernels treat a vector's tail apart).
    """
    if dim == 0:
        return axis_soft(x.t().contiguous(), t.t(), keep.t(), tau, 1).t()
    return torch.sigmoid((x - t) / tau) * keep


def axis_query(x: Tensor, n: int, m: int, tau: float, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Soft query of every set along ``dim`` of the 2-D magnitudes ``x``.

    Args:
        x: ``|W|`` viewed as ``[R, L]`` (sets are rows, ``dim=1``) or ``[L, R]`` (sets are columns, ``dim=0``).
        n, m: the N:M pattern; the query keeps the same density ``n / m``.
        tau: sigmoid temperature, absolute (in units of ``|W|``).

    Returns:
        ``(Q, t)``: ``Q`` of ``x``'s shape with values in ``{0} U [0.5, 1]``, and the thresholds ``t``
        (``x``'s shape with ``dim`` reduced to 1).
    """
    t, _, keep = axis_threshold(x, n, m, tau, dim)
    return axis_soft(x, t, keep, tau, dim), t


def filter_query(a: Tensor, n: int, m: int, tau: float) -> tuple[Tensor, Tensor]:
    """``Q_f``: one query per output filter (Conv2d: its ``I*kh*kw`` weights; Linear: its row).

    Args:
        a: ``|W|``, ``[O, I]`` or ``[O, I, kh, kw]``.

    Returns:
        ``(Q_f, t)`` with ``Q_f`` of ``a``'s shape and ``t`` ``[O, 1]``.
    """
    q, t = axis_query(a.reshape(a.shape[0], -1), n, m, tau, 1)
    return q.view(a.shape), t


def kernel_query(a: Tensor, n: int, m: int, tau: float) -> tuple[Tensor, Tensor] | None:
    """``Q_k``: one query per kernel position ``(kh, kw)`` over all ``O*I`` weights at that position.

    Returns ``None`` for Linear weights and 1x1 kernels (``Q_k = 0``), else ``(Q_k, t)`` with ``t`` ``[1, kh*kw]``.
    """
    if a.dim() != 4 or a.shape[2] * a.shape[3] == 1:
        return None
    x = a.reshape(-1, a.shape[2] * a.shape[3])  # [O*I, kh*kw]: each column is one query set
    q, t = axis_query(x, n, m, tau, 0)
    return q.view(a.shape), t
