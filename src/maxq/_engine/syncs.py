"""Detect device-to-host synchronizations in a block of code (a training step must not have any).

On CUDA this is ``torch.cuda.set_sync_debug_mode``: ``"warn"`` to count, ``"error"`` to fail at the first one. On
the CPU nothing synchronizes, so the same question is answered by watching the dispatcher for the operations that
would synchronize on CUDA: reading a value back (``.item()``, ``bool(t)``, ``int(t)``), ``nonzero``, boolean
indexing, ``masked_select``, ``unique``, ``equal``. It is an approximation (host copies are invisible on the CPU),
good enough to rehearse a CUDA check on a machine without a GPU.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "host_syncs"]


class HostSync(RuntimeError):
    """A synchronizing operation ran where none was allowed."""


#: aten ops (overload packets, by name) that make the host wait for the device on CUDA.
_SYNCING = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(), int(), float()
        "nonzero",
        "masked_select",
        "equal",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "repeat_interleave",  # the Tensor overload without output_size
    }
)
_BOOL_INDEXED = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _caller() -> str:
    """``file:line`` of the innermost Python frame outside torch and this module (where the sync was asked for)."""
    frame = sys._getframe(2)
    torch_dir = Path(torch.__file__).parent
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path != Path(__file__) and torch_dir not in path.parents:
            return f"{path.name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class _SyncWatch(TorchDispatchMode):
    def __init__(self, events: list[str], fail: bool) -> None:
        super().__init__()
        self.events, self.fail = events, fail

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        syncs = name in _SYNCING or (name in _BOOL_INDEXED and _has_bool_index(args))
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            syncs = False
        if syncs:
            self.events.append(f"aten.{name} at {_caller()}")
            if self.fail:
                raise HostSync(f"host synchronization: {self.events[-1]}")
        return func(*args, **(kwargs or {}))


@contextmanager
def host_syncs(device: torch.device | str, fail: bool = False) -> Iterator[list[str]]:
    """Collect the host synchronizations of the block into the yielded list: one ``"<what> at <file>:<line>"`` per
    sync, the line being the innermost Python code outside torch that caused it.

    Args:
        device: the device the block computes on: CUDA uses torch's sync debug mode, the CPU the dispatcher watch.
        fail: raise at the first one (`HostSync` on the CPU, torch's ``RuntimeError`` on CUDA) instead of
            counting.
    """
    events: list[str] = []
    if torch.device(device).type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("error" if fail else "warn")
            try:
                yield events
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if "synchronizing" in str(w.message)]
        events.extend(f"sync at {Path(w.filename).name}:{w.lineno}" for w in syncs)
        return
    with _SyncWatch(events, fail):
        yield events
