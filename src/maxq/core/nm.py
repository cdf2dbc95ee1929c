"""N:M conventions and the hard N:M mask (pure functions, no module state).

Convention (METHOD.md §1): **N:M keeps N of every M** weights, ``1 <= N < M``. Blocks run along the *input* axis:

* ``Linear`` weight ``W[O, I]``: blocks are ``M`` consecutive inputs of one row.
* ``Conv2d`` weight ``W[O, I, kh, kw]``: blocks are ``M`` consecutive input channels at a fixed
  ``(o, kh, kw)`` -- view the weight as ``[O, kh, kw, I]`` and cut the last axis into blocks of ``M``.
* Hugging Face ``Conv1D`` (GPT-2 family) weight stored ``W[I, O]`` (forward ``x @ W + b``): the same blocks of
  ``M`` consecutive inputs of one output, i.e. along dim 0 of the stored tensor. Every function here takes the
  ``[O, I(, kh, kw)]`` view; `oi_view` gives it from the stored tensor and its input axis (a property of
  the layer kind: `maxq.core.layers.input_axis`).

This is the layout sparse tensor cores, TensorRT and ``torch.sparse.to_sparse_semi_structured`` use.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = [
    "block_kth_largest",
    "block_major",
    "from_blocks",
    "key_value",
    "nm_keep",
    "nm_mask",
    "oi_view",
    "order_keys",
    "parse_nm",
    "to_blocks",
    "topk_mask",
    "validate_nm",
]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def validate_nm(n: int, m: int) -> tuple[int, int]:
    """Check an N:M pattern (keep ``n`` of every ``m``); return it as ints or raise ``ValueError``."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"N:M pattern: {name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"N:M pattern {n}:{m}: n must be >= 1 (n counts the weights kept per block)")
    if n >= m:
        raise ValueError(
            f"N:M pattern {n}:{m}: n must be < m (n counts the weights *kept* of every m; "
            f"for 50% sparsity write 2:4, not 4:2)"
        )
    return n, m


def parse_nm(text: str) -> tuple[int, int]:
    """Parse ``"2:4"`` into ``(2, 4)``.

    Args:
        text: ``"N:M"`` with integers.

    Raises:
        ValueError: anything else, or an invalid pattern (``n >= m``, ``n < 1``).

    Example:
        >>> parse_nm("1:16")
        (1, 16)
    """
    match = _NM_RE.match(str(text))
    if not match:
        raise ValueError(f"cannot parse N:M pattern {text!r}: write it as N:M with integers, e.g. 2:4 or 1:16")
    return validate_nm(int(match.group(1)), int(match.group(2)))


def oi_view(weight: Tensor, input_axis: int = 1) -> Tensor:
    """``weight`` as ``[O, I(, kh, kw)]``, the layout every N:M function takes, from its stored layout.

    ``input_axis=1`` (Linear ``[O, I]``, Conv2d ``[O, I, kh, kw]``): ``weight`` itself; ``input_axis=0`` (a 2-D
    weight stored ``[I, O]``, as Hugging Face ``Conv1D``): the transposed view (no copy; writes go through).
    """
    if input_axis == 1:
        return weight
    if input_axis == 0 and weight.dim() == 2:
        return weight.t()
    raise ValueError(f"input axis {input_axis!r} of a weight of shape {tuple(weight.shape)}: use 1, or 0 for 2-D")


def _check_layout(shape: torch.Size | tuple[int, ...], m: int) -> None:
    if len(shape) not in (2, 4):
        raise ValueError(f"N:M blocks need a Linear [O, I] or Conv2d [O, I, kh, kw] weight, got shape {tuple(shape)}")
    if shape[1] % m:
        raise ValueError(f"input size {shape[1]} of weight {tuple(shape)} is not divisible by m={m}")


def to_blocks(weight: Tensor, m: int) -> Tensor:
    """Group a weight into N:M blocks.

    Args:
        weight: ``[O, I]`` (Linear) or ``[O, I, kh, kw]`` (Conv2d), ``I % m == 0``.
        m: block size.

    Returns:
        ``[G, m]`` with ``G = weight.numel() // m``; block ``g`` holds ``m`` consecutive input channels.
        Rows are ordered ``(o, kh, kw, i // m)``.
    """
    _check_layout(weight.shape, m)
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, m)


def from_blocks(blocks: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of `to_blocks`: ``[G, m]`` back to the weight ``shape``."""
    shape = tuple(shape)
    _check_layout(shape, blocks.shape[-1])
    if len(shape) == 4:
        o, i, kh, kw = shape
        # A fresh tensor has the standard strides (``.contiguous()`` would keep odd strides on size-1 dims).
        return blocks.new_empty(shape).copy_(blocks.reshape(o, kh, kw, i).permute(0, 3, 1, 2))
    return blocks.reshape(shape)


def order_keys(x: Tensor, dim: int = -1, offset: int = 0, total: int | None = None) -> Tensor:
    """int64 keys, one per entry, that order the entries along ``dim`` by value and break every tie by index, the
    lower index counting as larger: the tie rule of the whole library as a plain integer order.

    The high 32 bits are the float32 value made sortable as an integer (IEEE bits, with the negative half
    flipped; NaN sorts above +inf), the low 32 bits the reversed index. All keys along ``dim`` are distinct, so a
    selection needs no tie handling: no data-dependent branch and no host synchronisation.

    ``offset``, ``total``: the entries along ``dim`` are entries ``offset ..`` of a set of ``total`` (a shard of
    it, [`maxq.core.sharding`][maxq.core.sharding]): the index is the one in the whole set.
    """
    bits = (x.detach().to(torch.float32) + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger bits are smaller values
    length = x.shape[dim]
    total = length if total is None else total
    shape = [1] * x.dim()
    shape[dim] = length
    first = total - 1 - offset
    reverse = torch.arange(first, first - length, -1, device=x.device, dtype=torch.int64).view(shape)
    return bits.to(torch.int64) * 2**32 + reverse


def key_value(keys: Tensor) -> Tensor:
    """The float32 value a key of `order_keys` was made from."""
    bits = (keys >> 32).to(torch.int32)  # arithmetic shift: the low 32 bits are the (non-negative) index
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)


def topk_mask(scores: Tensor, k: int, dim: int = -1, span=None) -> Tensor:
    """Boolean mask of the ``k`` largest entries along ``dim``; ties go to the lower index.

    Exact, deterministic (unlike ``torch.topk`` indices on ties) and free of host synchronisation: one k-th
    value selection over unique `order_keys`. ``k`` is clamped to ``[0, L]``.

    Args:
        scores: floating scores, ``L`` entries along ``dim``.
        k: how many to keep per set (a Python int).
        span: a [`Span`][maxq.core.sharding.Span] when ``scores`` holds this rank's part of 1-D sets spread over
            ranks (``k`` counts over the whole set; the selection is a collective).

    Returns:
        bool tensor of ``scores``' shape with exactly ``k`` True per set (over all ranks, with ``span``).
    """
    sharded = span is not None and span.group is not None
    length = span.total if sharded else scores.shape[dim]
    if k >= length:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if sharded:
        from .sharding import global_kth

        keys = order_keys(scores, dim, span.offset, span.total)
        flat = keys.reshape(1, -1) if scores.dim() == 1 else keys.movedim(dim, -1)
        kth = global_kth(flat.reshape(-1, flat.shape[-1]), length - k + 1, span.group)
        kth = kth.view(1) if scores.dim() == 1 else kth.view(*flat.shape[:-1], 1).movedim(-1, dim)
        return keys >= kth
    keys = order_keys(scores, dim)
    # The k-th largest key is the (L - k + 1)-th smallest.
    return keys >= keys.kthvalue(length - k + 1, dim=dim, keepdim=True).values


def block_major(a: Tensor, m: int) -> Tensor:
    """Copy of ``a`` (``[O, I]`` or ``[O, I, kh, kw]``) as ``[m, O, I // m, K]``: slice ``x`` holds channel ``x``
    of every block, so per-block work becomes ``m`` contiguous elementwise passes."""
    o, i = a.shape[0], a.shape[1]
    return a.reshape(o, i // m, m, -1).permute(2, 0, 1, 3).contiguous()


def block_kth_largest(blocks: Tensor, n: int) -> Tensor:
    """The ``n``-th largest value of every block, from a `block_major` copy ``[m, ...]`` (any dtype with an
    order, keys included): an insertion network of min/max passes (elementwise, fast on every device). Returns
    ``blocks.shape[1:]``."""
    top: list[Tensor] = []  # running n largest, descending
    for x in range(blocks.shape[0]):
        s = blocks[x]
        for j in range(len(top)):
            top[j], s = torch.maximum(top[j], s), torch.minimum(top[j], s)
        if len(top) < n:
            top.append(s)
    return top[n - 1]


def nm_keep(a: Tensor, n: int, m: int, dense: Tensor | None = None) -> Tensor:
    """Hard N:M keep-mask of magnitudes ``a`` (``[O, I]`` or ``[O, I, kh, kw]``), bool, free of host syncs.

    Args:
        dense: optional bool ``[G]`` in native block order ``(o, i // m, kh, kw)``: blocks kept whole.

    Returns:
        bool tensor of ``a``'s shape; ties at the cut go to the lower input channel.
    """
    o, i = a.shape[0], a.shape[1]
    keys = order_keys(block_major(a, m), 0)  # [m, O, I // m, K]: channel x of every block, tie-broken by channel
    keep = keys >= block_kth_largest(keys, n)
    if dense is not None:
        keep |= dense.view(1, o, i // m, -1)
    return keep.permute(1, 2, 0, 3).reshape(a.shape)


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Hard N:M mask of ``weight``: in every block keep the ``n`` largest ``|w|`` (ties: lower channel wins).

    Args:
        weight: ``[O, I]`` or ``[O, I, kh, kw]`` floating tensor.
        n: weights kept per block (``1 <= n < m``).
        m: block size along input channels; must divide the input size.

    Returns:
        bool tensor of ``weight``'s shape with exactly ``n`` True per block.

    Raises:
        ValueError: an invalid pattern, or a shape whose input size ``m`` does not divide.
    """
    validate_nm(n, m)
    _check_layout(weight.shape, m)
    with torch.no_grad():
        a = weight.detach().abs()
        return nm_keep(a, n, m)
