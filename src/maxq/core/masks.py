"""The MaxQ mask ``B_t * (1 + Q_f + Q_k)`` and its parts, as pure functions ``weight -> mask``.

``B_t`` is the hard N:M mask with a fraction ``p`` of blocks kept dense (incremental sparsity); ``Q_f`` and
``Q_k`` are the axis queries of `maxq.core.queries`. The values are 0 on pruned weights and in ``[1, 3]``
on kept ones, so the soft terms re-weight survivors but never change which weights survive.

One definition, two implementations with the same results (the same surviving weights, the same thresholds,
values equal to float rounding): the code here, built from ops that never synchronise with the host (it runs
on any device and under ``torch.compile``), and the fused CPU kernels of the private engine, used for float32
CPU weights. `compute_mask_` picks one.

**Lean storage.** A mask is never kept as a weight-sized float tensor. What decides it is its *state*
(`compute_state_`): bit planes -- which weights are kept (``B_t``) and, for the soft mask, which ones each
axis query keeps -- and the thresholds ``t`` of the queries (one per filter and one per kernel position). The soft
values ``1 + Q_f + Q_k`` are a function of the weight and that state, so `masked_weight` recomputes
``W * Mask`` from them whenever it is needed (the forward, and again in backward), with the very operations of
the implementation that computed the state: the result is bit for bit the float mask `maxq_mask` gives.
That holds while the weight is the one the state was computed from -- the paper's mask update after every
optimizer step -- so a soft mask updated less often keeps its values (`maxq.core.parametrization.NMMask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .._engine.fused import FusedState, fused_apply_, fused_available, fused_state_
from .._engine.kernels import cpu_kernels, same_walk
from .bits import pack_rows, packed_width, unpack_rows
from .nm import _check_layout, block_major, nm_keep, oi_view, topk_mask, validate_nm
from .queries import axis_soft, axis_threshold
from .sharding import RowSharding, Span

__all__ = [
    "BLOCK_ORDERS",
    "SOFT_WARMUPS",
    "MaskSpec",
    "block_l1",
    "compute_mask_",
    "compute_state_",
    "dense_blocks",
    "dense_count",
    "hard_mask",
    "kept_mean",
    "join_pruned_",
    "kept_row_chunks",
    "masked_weight",
    "materialize_mask",
    "maxq_mask",
    "rows_per_chunk",
    "split_pruned_",
    "state_shapes",
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


def dense_blocks(
    l1: Tensor, count: int, order: str = "smallest", priority: Tensor | None = None, span: Span | None = None
) -> Tensor:
    """Pick ``count`` blocks to keep dense (ties go to the lower block index).

    Args:
        l1: ``[G]`` block L1 norms.
        count: how many (see `dense_count`).
        order: ``"smallest"`` L1 (paper default: high-norm blocks become N:M first), ``"largest"`` or ``"random"``.
        priority: ``[G]`` random scores, required for ``"random"`` (keep it fixed across steps).
        span: the layer's blocks are spread over ranks and ``l1`` (``priority``) hold this rank's
            ([`maxq.core.sharding.Span`][maxq.core.sharding.Span]; ``count`` then counts over all ranks).

    Returns:
        bool ``[G]`` with exactly ``min(max(count, 0), G)`` True (over all ranks, with ``span``).
    """
    if order not in BLOCK_ORDERS:
        raise ValueError(f"unknown block order {order!r}; choose one of {BLOCK_ORDERS}")
    if order == "random":
        if priority is None or priority.shape != l1.shape:
            raise ValueError("order='random' needs a priority tensor with one score per block")
        return topk_mask(priority.to(l1.device), count, span=span)
    # "smallest": the count largest of -l1 (negation is exact), ties to the lower index either way.
    return topk_mask(-l1 if order == "smallest" else l1, count, span=span)


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
        mask.div_(kept_mean(mask).to(mask.dtype))
    return mask


def kept_mean(mask: Tensor) -> Tensor:
    """Mean of ``mask`` over its nonzero (kept) entries, as a float32 0-dim tensor (at least the smallest normal
    float, so that dividing by it is safe): the divisor of `soften_`'s ``normalize``."""
    total = mask.sum(dtype=torch.float32)
    count = mask.ne(0).sum().clamp_min(1).to(torch.float32)
    return (total / count).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class MaskSpec:
    """What a layer's mask state means (static per layer; hashable, so ``torch.compile`` guards on it).

    Attributes:
        n, m: the N:M pattern.
        soft: the state holds the axis queries (MaxQ's ``1 + Q_f + Q_k``); else the mask is ``B_t`` (0/1).
        tau: query temperature.
        input_axis: the axis of the stored weight that runs over its inputs (0 for HF ``Conv1D``).
        fused: the state was computed by the fused CPU kernels, so the soft values are recomputed with their
            operations (where the weight is a float32 CPU tensor; elsewhere the device-agnostic ones, equal to float
            rounding).
        strength: the soft factor's warm-up strength is not 1 (its value is the ``scale[0]`` tensor).
        normalize: the kept values are divided by their mean (the divisor is the ``scale[1]`` tensor).
    """

    n: int
    m: int
    soft: bool
    tau: float = 0.01
    input_axis: int = 1
    fused: bool = False
    strength: bool = False
    normalize: bool = False


def state_shapes(shape: tuple[int, ...], soft: bool, input_axis: int = 1) -> tuple[tuple[int, ...], int]:
    """``(planes shape, threshold count)`` of the mask state of a weight of stored ``shape``: planes uint8
    ``[P, O, ceil(L / 8)]`` (``P`` = 1 hard, 2 soft, 3 soft with a kernel larger than 1x1; ``L = I * kh * kw``)
    and ``2 * O + 2 * K`` float32 thresholds for a soft mask (0 for a hard one)."""
    oi = (shape[1], shape[0]) if input_axis == 0 else tuple(shape)
    o, i = oi[0], oi[1]
    k = 1
    for d in oi[2:]:
        k *= d
    planes = 1 if not soft else (3 if k > 1 else 2)
    return (planes, o, packed_width(i * k)), (2 * o + 2 * k if soft else 0)


def compute_state_(
    planes: Tensor,
    thresholds: Tensor,
    weight: Tensor,
    n: int,
    m: int,
    *,
    dense_fraction: float = 0.0,
    order: str = "smallest",
    priority: Tensor | None = None,
    tau: float = 0.01,
    soft: bool = True,
    state: FusedState | None = None,
    fused: bool = True,
    sharding: RowSharding | None = None,
) -> bool:
    """Write the mask state of ``weight`` (an ``[O, I(, kh, kw)]`` view, any device) in place; no gradient.

    ``planes`` (uint8 ``[P, O, ceil(L / 8)]``, `state_shapes`): plane 0 the kept weights of ``B_t`` (the
    ramp's dense blocks whole); for a soft mask plane 1 the filter query's keep flags and, for kernels larger than
    1x1, plane 2 the kernel query's. ``thresholds`` (float32 ``[2*O + 2*K]``, soft only): ``t`` and ``a(k)`` of every
    filter set, then of every kernel set. Other arguments as `maxq_mask` (not validated: the training hot
    path); ``fused=False`` forces the device-agnostic path. With ``sharding`` (a
    [`RowSharding`][maxq.core.sharding.RowSharding]), ``weight``, ``planes`` and ``priority`` hold this rank's rows
    and ``thresholds`` the whole layer's: the layer-wide order statistics (kernel query, the ramp's dense blocks)
    are collectives, and the rows' own are written here only. Returns whether the fused kernels computed it.
    """
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        w = weight.detach()
        per_row = w[0].numel() // m if w.shape[0] else 0
        count = dense_count(dense_fraction, per_row * sharding.rows if sharding else w.numel() // m)
        layer_wide = sharding is not None and (count > 0 or (soft and w[0, 0].numel() > 1))
        if fused and not layer_wide and fused_available(w) and planes.device.type == "cpu" and w.shape[0] > 0:
            # Sharded: the kernel writes this rank's rows' thresholds (no kernel query here: it is layer-wide).
            local_thr = thresholds if sharding is None or not soft else thresholds.new_empty(2 * w.shape[0] + 2)
            fused_state_(
                planes,
                local_thr,
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
            if sharding is not None and soft:
                o, rows, first = w.shape[0], sharding.rows, sharding.offset
                thresholds[first : first + o].copy_(local_thr[:o])
                thresholds[rows + first : rows + first + o].copy_(local_thr[o : 2 * o])
                _gather_row_thresholds(thresholds, sharding)
            return True
        o = w.shape[0]
        rows, first = (sharding.rows, sharding.offset) if sharding else (o, 0)
        k = w[0, 0].numel() if w.dim() == 4 else 1
        # Row by row in chunks (every statistic below but the kernel query's is a row's own): the float32
        # magnitudes and the selections' indices of one chunk at a time, not of the whole layer.
        chunks = _row_chunks(w)
        dense = None
        if count > 0:
            span = sharding.span(per_row) if sharding else None
            parts = [block_l1(w[r0:r1].abs().float(), m) for r0, r1 in chunks]
            l1 = torch.cat(parts) if parts else w.new_empty(0, dtype=torch.float32)
            dense = dense_blocks(l1, count, order, priority, span).view(o, per_row)
        for r0, r1 in chunks:
            a = w[r0:r1].abs().float()
            dense_rows = None if dense is None else dense[r0:r1].reshape(-1)
            planes[0, r0:r1].copy_(pack_rows(nm_keep(a, n, m, dense_rows).reshape(r1 - r0, -1)))
            if soft:
                t, cut, keep = axis_threshold(a.reshape(r1 - r0, -1), n, m, tau, 1)
                planes[1, r0:r1].copy_(pack_rows(keep))
                thresholds[first + r0 : first + r1].copy_(t.view(-1))
                thresholds[rows + first + r0 : rows + first + r1].copy_(cut.view(-1))
        if soft:
            if k > 1:  # the kernel query: its sets are columns across all the rows
                a = w.abs().float()
                span = sharding.span(a.shape[1]) if sharding else None
                t, cut, keep = axis_threshold(a.reshape(-1, k), n, m, tau, 0, span)
                planes[2].copy_(pack_rows(keep.reshape(o, -1)))
                thresholds[2 * rows : 2 * rows + k].copy_(t.reshape(-1))
                thresholds[2 * rows + k :].copy_(cut.reshape(-1))
            if sharding is not None:
                _gather_row_thresholds(thresholds, sharding)
        return False


def rows_per_chunk(length: int, device: torch.device, entries: int | None = None) -> int:
    """Rows of ``length`` weights per chunk of the row-wise paths: about ``entries`` weights, by default 2^18 on the
    CPU (a few MiB of temporaries) and 2^22 elsewhere (fewer kernel launches); at least one row. The values computed
    do not depend on it."""
    if entries is None:
        entries = 1 << 18 if device.type == "cpu" else 1 << 22
    return max(1, entries // max(1, length))


def _chunk_rows(w: Tensor, entries: int | None = None) -> int:
    """`rows_per_chunk` for the rows of ``w``."""
    return rows_per_chunk(w[0].numel(), w.device, entries) if w.shape[0] else 1


def _row_chunks(w: Tensor, entries: int | None = None) -> list[tuple[int, int]]:
    """``(first, end)`` row ranges of `_chunk_rows` rows (the last may be shorter) covering ``w``'s rows."""
    o, step = w.shape[0], _chunk_rows(w, entries)
    return [(r, min(r + step, o)) for r in range(0, o, step)]


def kept_row_chunks(w: Tensor, planes: Tensor, entries: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """``(first, end, kept)`` over the row chunks of the ``[O, I(, kh, kw)]`` view ``w`` (about ``entries`` weights
    each, see `_chunk_rows`): ``kept`` is bool, shaped like ``w[first:end]``, from plane 0 of ``planes``. The eager
    paths that mask a weight-sized tensor (the one-shot gradient, SR-STE's decay) walk these, so their temporaries
    are a chunk's, not the layer's."""
    length = w[0].numel() if w.shape[0] else 0
    for first, end in _row_chunks(w, entries):
        yield first, end, unpack_rows(planes[0, first:end], length).view(w[first:end].shape)


def _slots(w: Tensor, planes: Tensor, spare: int) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """``(first, rows, kept, slot)`` per row chunk of ``w``: ``slot`` (int64 ``[r, L]``) is each pruned weight's
    place among its row's pruned ones, and ``spare`` for kept weights."""
    length = w[0].numel() if w.shape[0] else 0
    # The int64 slots cost 8 bytes a weight: chunks of at most a sixteenth of the layer keep them well under the
    # copy of W * mask that the stash replaces.
    entries = max(1, min(_chunk_rows(w) * max(1, length), w.numel() // 16))
    for first, end, kept in kept_row_chunks(w, planes, entries):
        pruned = ~kept.reshape(end - first, length)
        yield first, w[first:end], kept, torch.where(pruned, pruned.cumsum(1) - 1, spare)


def split_pruned_(w: Tensor, planes: Tensor, n: int, m: int) -> Tensor:
    """Mask the ``[O, I(, kh, kw)]`` view ``w`` in place, ``w *= kept`` (a hard mask's ``W * mask``, bit for bit),
    after copying its pruned values out; returns that stash (``[O, S]``, ``w``'s dtype: a row's pruned values in row
    order, ``S = L - n * (L // m) + 1``: the most a row can prune and a spare slot), for `join_pruned_` to put
    them back.

    This is how backward gets ``W * mask`` without a second weight-sized tensor: the stash holds the pruned share
    ``(m - n) / m`` of the weights."""
    o, length = w.shape[0], w[0].numel() if w.shape[0] else 0
    slots = length - n * (length // m)
    # The spare slot takes the kept weights' values on the eager path (scatter_ needs a place for every element).
    stash = w.new_empty((o, slots + 1))
    with torch.no_grad():
        if fused_available(w) and planes.device.type == "cpu":
            cpu_kernels().split_(w, planes, stash)
            return stash
        for first, rows, kept, slot in _slots(w, planes, slots):
            stash[first : first + rows.shape[0]].scatter_(1, slot, rows.reshape(rows.shape[0], -1))
            rows.mul_(kept)
    return stash


def join_pruned_(w: Tensor, planes: Tensor, stash: Tensor) -> None:
    """Undo `split_pruned_`: the pruned values of ``w`` back from ``stash``, in place."""
    with torch.no_grad():
        if fused_available(w) and planes.device.type == "cpu":
            cpu_kernels().join_(w, planes, stash)
            return
        for first, rows, kept, slot in _slots(w, planes, stash.shape[1] - 1):
            back = stash[first : first + rows.shape[0]].gather(1, slot).view(rows.shape)
            rows.copy_(torch.where(kept, rows, back))


def _gather_row_thresholds(thresholds: Tensor, sharding: RowSharding) -> None:
    """Every rank wrote its rows' ``t`` and ``a(k)``; make the layer's whole (replicated) copy on every rank."""
    rows, first, local = sharding.rows, sharding.offset, sharding.local
    part = thresholds[: 2 * rows].view(2, rows)
    mine = part[:, first : first + local].contiguous()
    part.copy_(sharding.from_local(mine, 1, (2, rows)).full_tensor())


def _materialize_eager(w: Tensor, planes: Tensor, thresholds: Tensor, spec: MaskSpec) -> Tensor:
    """The float32 mask of the ``[O, I(, kh, kw)]`` view ``w`` from its state (contiguous): the operations of the
    device-agnostic path of `compute_mask_` as it stood when the masks were stored whole."""
    a = w.abs().float()
    o, length = a.shape[0], a[0].numel()
    mask = unpack_rows(planes[0], length).view(a.shape).to(torch.float32)
    if spec.soft:
        q = axis_soft(a.reshape(o, -1), thresholds[:o].view(o, 1), unpack_rows(planes[1], length), spec.tau, 1)
        q = q.view(a.shape)
        k = a[0, 0].numel()
        if k > 1:
            keep = unpack_rows(planes[2], length).view(-1, k)
            kq = axis_soft(a.reshape(-1, k), thresholds[2 * o : 2 * o + k].view(1, k), keep, spec.tau, 0)
            q = q + kq.view(a.shape)
        mask = mask * (1 + q)
    return mask


def materialize_mask(weight: Tensor, planes: Tensor, thresholds: Tensor, scale: Tensor, spec: MaskSpec) -> Tensor:
    """The float32 mask of ``weight`` (stored layout, any device) from its state: 0 on pruned weights, ``>= 1`` on
    kept ones, warmed up by ``scale`` (``[strength, divisor]``, as ``spec`` says); an ``[O, I(, kh, kw)]`` tensor
    (for a transposed ``Conv1D`` weight: the transposed view of a stored-layout one). No gradient."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        w = oi_view(weight.detach(), spec.input_axis)
        if spec.fused and fused_available(w) and planes.device.type == "cpu":
            # The layout the fused path wrote the mask in (a contiguous tensor of the stored shape), so that the
            # warm-up's reduction runs over the same order.
            out = oi_view(torch.empty(weight.shape, dtype=torch.float32), spec.input_axis)
            if not same_walk(out, w):  # e.g. a channels_last weight: the values do not depend on its layout
                w = oi_view(oi_view(w, spec.input_axis).contiguous(), spec.input_axis)
            mask = fused_apply_(
                out, w, planes, thresholds, n=spec.n, m=spec.m, soft=spec.soft, tau=spec.tau, weighted=False
            )
        else:
            mask = _materialize_eager(w, planes, thresholds, spec)
        return _warm_up(mask, scale, spec)


def _warm_up(mask: Tensor, scale: Tensor, spec: MaskSpec) -> Tensor:
    """The soft factor's warm-up on a float32 ``mask``, in place: `soften_`'s operations, with the strength as a
    tensor (no recompiles), and the division by the kept mean."""
    if spec.soft and spec.strength:
        kept = mask.ne(0).to(mask.dtype)
        mask.sub_(kept).mul_(scale[0]).add_(kept)
    if spec.soft and spec.normalize:
        mask.div_(scale[1])
    return mask


def masked_weight(weight: Tensor, planes: Tensor, thresholds: Tensor, scale: Tensor, spec: MaskSpec) -> Tensor:
    """``W * Mask`` from the weight and its mask state, in the weight's dtype and memory layout (a new tensor; no
    gradient): bit for bit ``weight * mask`` with the float mask `compute_mask_` writes."""
    # The forward's hot path: no autocast context (only elementwise ops here, which autocast leaves alone).
    with torch.no_grad():
        w = weight.detach()
        out = torch.empty_like(w)
        oi = oi_view(w, spec.input_axis)
        kernel = not spec.soft or (spec.fused and not (spec.strength or spec.normalize))
        if kernel and w.dtype == torch.float32 and w.device.type == "cpu" and fused_available(oi):
            fused_apply_(
                oi_view(out, spec.input_axis),
                oi,
                planes,
                thresholds,
                n=spec.n,
                m=spec.m,
                soft=spec.soft,
                tau=spec.tau,
                weighted=True,
            )
            return out
        if spec.soft and spec.fused and fused_available(oi) and planes.device.type == "cpu":
            mask = materialize_mask(w, planes, thresholds, scale, spec).to(w.dtype)
            return torch.mul(w, oi_view(mask, spec.input_axis), out=out)
        # Elsewhere (another dtype or device) row chunks of about a million weights: the same values, with the
        # float32 mask of one chunk at a time instead of the whole layer's.
        o, length, out_oi = oi.shape[0], oi[0].numel(), oi_view(out, spec.input_axis)
        for r0, r1 in _row_chunks(oi):
            rows = oi[r0:r1]
            if not spec.soft:
                keep = unpack_rows(planes[0, r0:r1], length).view(rows.shape)
                torch.mul(rows, keep, out=out_oi[r0:r1])
                continue
            part = torch.cat((thresholds[r0:r1], thresholds[o + r0 : o + r1], thresholds[2 * o :]))
            mask = _warm_up(_materialize_eager(rows, planes[:, r0:r1], part, spec), scale, spec)
            torch.mul(rows, mask.to(w.dtype), out=out_oi[r0:r1])
        return out


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

    Arguments as `maxq_mask` (not validated here: this is the training hot path). ``state`` carries the
    fused CPU kernels' thresholds from one call to the next (speed only); ``fused=False`` forces the
    device-agnostic path. The soft factor's warm-up (``strength``, ``normalize``: `soften_`) is applied to
    the result of either path. The mask is the state `compute_state_` computes, materialized by
    `materialize_mask`: one formula for stored and recomputed masks. Returns ``out``.
    """
    with torch.no_grad():
        w = weight.detach()
        planes_shape, count = state_shapes(tuple(w.shape), soft)
        planes = torch.empty(planes_shape, dtype=torch.uint8, device=w.device)
        thresholds = torch.empty(count, dtype=torch.float32, device=w.device)
        used = compute_state_(
            planes, thresholds, w, n, m, dense_fraction=dense_fraction, order=order, priority=priority, tau=tau,
            soft=soft, state=state, fused=fused,
        )  # fmt: skip
        spec = MaskSpec(n, m, soft, tau, 1, used)
        mask = materialize_mask(w, planes, thresholds, w.new_ones(2, dtype=torch.float32), spec)
        if soft:
            mask = soften_(mask, strength, normalize)
        return out.copy_(mask)
