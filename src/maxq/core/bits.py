"""Bit planes: boolean ``[R, L]`` flags packed eight to a byte, the storage of every mask maxq keeps.

Row ``r``, entry ``j`` is bit ``j % 8`` (lowest first) of byte ``j // 8`` of row ``r``; every row is padded to whole
bytes (``ceil(L / 8)``), so rows never share a byte and can be written in parallel. The fused CPU kernels
(``maxq._engine``) read and write the same layout. Pure tensor ops: any device, no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_rows", "packed_width", "unpack_rows"]


def packed_width(length: int) -> int:
    """Bytes per packed row of ``length`` flags: ``ceil(length / 8)``."""
    return (length + 7) // 8


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(8, device=device, dtype=torch.uint8)


def pack_rows(flags: Tensor) -> Tensor:
    """Pack bool ``[R, L]`` (or anything ``!= 0`` means set) into uint8 ``[R, ceil(L / 8)]``."""
    rows, length = flags.shape
    width = packed_width(length)
    bits = flags.ne(0).to(torch.uint8)
    if width * 8 != length:
        bits = torch.nn.functional.pad(bits, (0, width * 8 - length))
    # The eight bits of a byte are disjoint, so their sum is their bitwise or (at most 255: no overflow).
    return (bits.view(rows, width, 8) << _shifts(flags.device)).sum(-1, dtype=torch.uint8)


def unpack_rows(packed: Tensor, length: int) -> Tensor:
    """Unpack uint8 ``[..., R, ceil(L / 8)]`` into bool ``[..., R, L]`` (a fresh contiguous tensor)."""
    *lead, width = packed.shape
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    bits = bits.view(*lead, width * 8)
    if width * 8 != length:
        bits = bits[..., :length]
    return bits.bool()
