"""Count the tensor calls that make the host wait for the device (a plain-Python stand-in for CUDA's sync debug
mode, usable on the CPU): ``.item()``, ``bool(t)``, ``int(t)``, ``nonzero``, boolean-mask indexing, ..."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SYNCING = {
    Tensor.__bool__,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__,
    Tensor.__complex__,
    Tensor.item,
    Tensor.tolist,
    Tensor.numpy,
    Tensor.nonzero,
    torch.nonzero,
    Tensor.argwhere,
    torch.argwhere,
    Tensor.masked_select,
    torch.masked_select,
    Tensor.unique,
    torch.unique,
    torch.unique_consecutive,
    Tensor.repeat_interleave,
    torch.repeat_interleave,
    Tensor.cpu,
}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put, torch.index_put}


def _has_bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as c: ...`` then ``c.counts`` (a Counter by function name) and ``c.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING or (func in _INDEXING and _has_bool_index(args)):
            self.counts[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
