"""Reusable scratch buffers for mask computation.

A fresh multi-megabyte CPU tensor is a fresh ``mmap``: every page faults on first touch, which costs more than
the arithmetic itself. Mask computation runs every training step, so it borrows its temporaries from a
:class:`Workspace` that keeps one buffer per (name, dtype, device), grown to the largest layer and reused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Workspace", "scratch", "scratch_as"]


class Workspace:
    """Named scratch buffers; ``get`` returns a view of the right shape (contents undefined)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Free every buffer."""
        self._buffers.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def scratch(
    ws: Workspace | None, name: str, shape: tuple[int, ...] | torch.Size, like: Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """A buffer from ``ws``, or a fresh ``torch.empty`` when there is no workspace."""
    dtype = dtype or like.dtype
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    return ws.get(name, shape, dtype, like.device)


def scratch_as(ws: Workspace | None, name: str, rows: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A buffer shaped like the 2-D ``rows`` and laid out like it (row-major, or a transposed view)."""
    if rows.dim() == 2 and not rows.is_contiguous() and rows.t().is_contiguous():
        return scratch(ws, name, rows.t().shape, rows, dtype).t()
    return scratch(ws, name, rows.shape, rows, dtype)
