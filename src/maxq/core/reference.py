"""Plain reference implementation of every mask, written with full sorts for clarity, not speed.

It restates METHOD.md §2-3 as directly as possible. The tests hold the fast implementation to it, and
``benchmarks/mask_overhead.py`` times it as the naive baseline. Tie rule everywhere: a stable sort in descending
order puts the lower index first, i.e. the lower index counts as larger.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import block_l1
from .nm import from_blocks, to_blocks

__all__ = [
    "ref_dense_blocks",
    "ref_filter_query",
    "ref_kernel_query",
    "ref_maxq_mask",
    "ref_nm_mask",
    "ref_query",
    "ref_sparsifier_masks",
]


def _keep_largest(rows: Tensor, k: int) -> Tensor:
    """bool ``[R, L]``: the ``k`` largest of every row (ties: lower index), by a full stable sort."""
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(rows, dtype=torch.bool)
    keep.scatter_(-1, order[:, :k], True)
    return keep


def ref_nm_mask(weight: Tensor, n: int, m: int, input_axis: int = 1) -> Tensor:
    """Hard N:M mask: the ``n`` largest ``|w|`` of every block of ``m`` input channels (``input_axis=0``: of a 2-D
    weight stored ``[in, out]``, blocks down its columns)."""
    if input_axis == 0:
        return ref_nm_mask(weight.t().contiguous(), n, m).t().contiguous()
    blocks = to_blocks(weight.detach().abs(), m)
    return from_blocks(_keep_largest(blocks, n), weight.shape)


def ref_query(rows: Tensor, n: int, m: int, tau: float) -> tuple[Tensor, Tensor]:
    """Query of every row: ``(Q, t)`` per METHOD.md §2, by sorting each row."""
    length = rows.shape[-1]
    k = ((m - n) * length) // m
    ascending = torch.sort(rows, dim=-1).values
    if k == 0:
        t = ascending[:, 0] - tau
        return torch.sigmoid((rows - t[:, None]) / tau), t
    t = (ascending[:, k - 1] + ascending[:, k]) / 2
    keep = _keep_largest(rows, length - k)
    return keep * torch.sigmoid((rows - t[:, None]) / tau), t


def ref_filter_query(a: Tensor, n: int, m: int, tau: float) -> Tensor:
    return ref_query(a.reshape(a.shape[0], -1), n, m, tau)[0].reshape(a.shape)


def ref_kernel_query(a: Tensor, n: int, m: int, tau: float) -> Tensor:
    if a.dim() != 4 or a.shape[2] * a.shape[3] == 1:
        return torch.zeros_like(a)
    o, i, kh, kw = a.shape
    q = ref_query(a.reshape(o * i, kh * kw).t().contiguous(), n, m, tau)[0]
    return q.t().reshape(a.shape)


def ref_dense_blocks(l1: Tensor, fraction: float, order: str = "smallest", priority: Tensor | None = None) -> Tensor:
    """``floor(fraction * G)`` blocks kept dense, by sorting (ties: lower block index first)."""
    count = int(fraction * l1.numel())
    if order == "smallest":
        ranked = torch.sort(l1, stable=True).indices
    elif order == "largest":
        ranked = torch.sort(l1, descending=True, stable=True).indices
    else:
        assert priority is not None
        ranked = torch.sort(priority, descending=True, stable=True).indices
    dense = torch.zeros_like(l1, dtype=torch.bool)
    dense[ranked[:count]] = True
    return dense


def ref_maxq_mask(
    weight: Tensor,
    n: int,
    m: int,
    *,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
    tau: float = 0.01,
    soft: bool = True,
    input_axis: int = 1,
) -> Tensor:
    """``B_t * (1 + Q_f + Q_k)`` with ``B_t`` the N:M mask plus ``floor(p * G)`` dense blocks.

    ``input_axis=0``: ``weight`` is a 2-D ``[in, out]`` (HF Conv1D) weight: its mask is that of the ``[out, in]``
    weight it holds (blocks, dense blocks and the filter query ``Q_f`` per output, i.e. per column), transposed.
    """
    if input_axis == 0:
        mask = ref_maxq_mask(
            weight.t().contiguous(),
            n,
            m,
            dense_fraction=dense_fraction,
            order=order,
            priority=priority,
            tau=tau,
            soft=soft,
        )
        return mask.t().contiguous()
    a = weight.detach().abs().float()
    keep = ref_nm_mask(a, n, m)
    if dense_fraction > 0:
        o, i = a.shape[:2]
        native = a.reshape(o, i // m, m, -1)  # native block order (o, i // m, kh, kw)
        dense = ref_dense_blocks(block_l1(a, m), dense_fraction, order, priority)
        keep = keep | dense.view(o, i // m, 1, -1).expand(native.shape).reshape(a.shape)
    mask = keep.float()
    if soft:
        mask = mask * (1 + ref_filter_query(a, n, m, tau) + ref_kernel_query(a, n, m, tau))
    return mask.to(weight.dtype)


def ref_sparsifier_masks(sparsifier) -> dict[str, Tensor]:
    """The reference mask of every layer of a [`maxq.Sparsifier`][maxq.Sparsifier], from its current weights and dense
    fraction: what ``named_masks()`` must hold right after an update."""
    cfg = sparsifier.config
    return {
        name: ref_maxq_mask(
            layer.weight,
            cfg.n,
            cfg.m,
            dense_fraction=sparsifier.dense_fraction,
            order=cfg.order,
            priority=layer.priority,
            tau=cfg.tau,
            soft=cfg.soft,
            input_axis=layer.param.input_axis,
        )
        for name, layer in sparsifier._layers.items()
    }
