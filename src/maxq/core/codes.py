"""Kept-index codes: a hard N:M mask in ``n * ceil(log2 m)`` bits a block instead of ``m``.

A hard mask that keeps exactly ``n`` weights of every block of ``m`` (SR-STE and one-shot: no block is ever kept
whole) is told completely by the positions of its kept weights: ``n`` numbers below ``m`` a block, ``b =
ceil(log2 m)`` bits each. Where that is fewer bits than the block has weights (``n * b < m``: half the bit plane
at 1:4, three eighths at 1:8, three quarters at 2:8, a quarter at 1:16; not 2:4, where both are 4 bits),
[`NMMask`][maxq.core.parametrization.NMMask] keeps this code instead of the bit plane of kept weights, and decodes
one layer's plane when something reads it (the forward, backward, the decay), freed after use.

Layout: row ``o`` of the ``[O, I, K]`` view of the weight (``K = kh * kw``) has ``G = I / m * K`` blocks, in the
order ``g = (i // m) * K + k``. The kept positions ``x_0 < ... < x_{n-1}`` of block ``g`` (its weights ``(g // K * m
+ x) * K + g % K`` of the row) are entries ``g * n + t`` of the row's code: ``b`` bits each, lowest first, in one
bit stream per row, padded to whole bytes as the bit planes are ([`maxq.core.bits`][maxq.core.bits]). The code of a
row is ``ceil(G * n * b / 8)`` bytes.

Pure tensor ops here (any device, ``torch.compile``), in the row chunks of the other row-wise paths
([`maxq.core.masks.rows_per_chunk`][maxq.core.masks.rows_per_chunk]) so that their temporaries are a chunk's; the
fused CPU kernels walk the same layout. Decoding gives the very bits that were encoded, so a mask held as a code
multiplies, prunes and decays the weights bit for bit as its bit plane does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._engine.kernels import cpu_kernels
from .bits import pack_rows, packed_width, unpack_rows
from .masks import rows_per_chunk

__all__ = ["code_width", "decode_kept", "encode_kept_", "exact_blocks", "index_bits", "uses_code"]


def index_bits(m: int) -> int:
    """Bits of one kept position in a block of ``m``: ``ceil(log2 m)`` (at least 1)."""
    return max(1, (m - 1).bit_length())


def uses_code(n: int, m: int, soft: bool, exact: bool) -> bool:
    """Whether a mask is held as a kept-index code: a hard mask (``not soft``) that keeps exactly ``n`` of every
    block (``exact``: no dense blocks), where the code is smaller than the bit plane (``n * ceil(log2 m) < m``)."""
    return exact and not soft and n * index_bits(m) < m


def code_width(length: int, n: int, m: int) -> int:
    """Bytes of the code of a row of ``length`` weights (``I * kh * kw``, a multiple of ``m``)."""
    return packed_width(length // m * n * index_bits(m))


def _fused(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous() and cpu_kernels() is not None


def decode_kept(code: Tensor, n: int, m: int, length: int, kernel: int) -> Tensor:
    """The bit plane of kept weights from its code: uint8 ``[1, O, ceil(L / 8)]`` (a new tensor) from uint8 ``[1, O,
    code_width(L)]`` (``L = length``; ``kernel``: ``K``, the kernel positions of a row)."""
    rows = code.shape[-2]
    planes = torch.empty((1, rows, packed_width(length)), dtype=torch.uint8, device=code.device)
    if _fused(code):
        torch.ops.maxq.decode_kept_(code, planes, n, m, length, kernel)
        return planes
    b, groups = index_bits(m), length // m
    shifts = torch.arange(b, device=code.device, dtype=torch.int32)
    positions = torch.arange(m, device=code.device, dtype=torch.int32)
    step = rows_per_chunk(length, code.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        bits = unpack_rows(code[0, r0:r1], groups * n * b).view(r1 - r0, groups, n, b)
        index = (bits.to(torch.int32) << shifts).sum(-1, dtype=torch.int32)  # [r, G, n], G = (I / m) * K
        kept = (index.view(r1 - r0, -1, kernel, n, 1) == positions).any(3)  # [r, I / m, K, m]
        planes[0, r0:r1] = pack_rows(kept.transpose(2, 3).reshape(r1 - r0, length))
    return planes


def encode_kept_(code: Tensor, planes: Tensor, n: int, m: int, length: int, kernel: int) -> Tensor:
    """Write the code of the bit plane ``planes`` (uint8 ``[1, O, ceil(L / 8)]``) into ``code`` (uint8 ``[1, O,
    code_width(L)]``); returns ``code``. Every block must keep exactly ``n`` (`exact_blocks`): the fused CPU kernel
    raises otherwise; the device-agnostic path does not check (that would be a host synchronisation)."""
    if _fused(code) and planes.is_contiguous():
        torch.ops.maxq.encode_kept_(planes, code, n, m, length, kernel)
        return code
    b, rows = index_bits(m), planes.shape[-2]
    shifts = torch.arange(b, device=planes.device, dtype=torch.int64)
    step = rows_per_chunk(length, planes.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        kept = unpack_rows(planes[0, r0:r1], length).view(r1 - r0, -1, m, kernel).transpose(2, 3)  # [r, I/m, K, m]
        # pruned sorts after kept, and a stable sort keeps each kind in position order: the first n are the kept
        first = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        bits = (first.unsqueeze(-1) >> shifts) & 1  # [r, I/m, K, n, b]
        code[0, r0:r1] = pack_rows(bits.reshape(r1 - r0, -1))
    return code


def exact_blocks(planes: Tensor, n: int, m: int, length: int, kernel: int) -> bool:
    """Whether every block of the bit plane ``planes`` (uint8 ``[1, O, ceil(L / 8)]``) keeps exactly ``n`` weights
    (a host synchronisation: for checking a loaded state, not the training step)."""
    rows = planes.shape[-2]
    step = rows_per_chunk(length, planes.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        kept = unpack_rows(planes[0, r0:r1], length).view(r1 - r0, -1, m, kernel)
        if not bool(kept.sum(2, dtype=torch.int32).eq(n).all()):
            return False
    return True
