"""Keep ``W * mask`` out of the autograd graph: recompute it in backward instead of keeping it from the forward.

A masked layer computes ``W_eff = W * mask`` and hands it to its op (``F.linear``, ``F.conv2d``, ``torch.addmm``),
which saves it for backward (the gradient of the layer's input needs it). Kept from forward to backward, that
copy costs as much memory as the weight itself. While a sparsified model runs its forward, maxq installs
saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) that replace such a saved ``W_eff`` (or a view
of it) by a small token, and rebuild it from ``W`` and the mask state when backward asks for it: the same bits,
since the mask state and the weight have not changed in between (checked with their version counters, as autograd
checks what it saves).

The hooks are pushed by forward pre-hooks on the sparsified model and on each sparsified layer (so a layer called on
its own is covered too) and popped by their forward hooks (``always_call``), once per outermost call. They stand
aside when:

* ``torch.compile`` is tracing: the compiler's partitioner decides what to save (``W * mask`` is cheap to
  recompute and it usually does);
* gradients are off (nothing is saved);
* someone else's saved-tensor hooks are active (activation checkpointing, offloading): only the innermost hooks
  run, so pushing ours would hide every other saved tensor from theirs. Their recomputation covers ``W_eff`` too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["install", "mark"]

_ATTR = "_maxq_recompute"
_local = threading.local()


class _Recompute:
    """How to rebuild one ``W_eff``: the function and the tensors whose version counters must not have moved."""

    __slots__ = ("fn", "tensors", "versions")

    def __init__(self, fn: Callable[[], Tensor], tensors: tuple[Tensor, ...]) -> None:
        self.fn = fn
        self.tensors = tensors
        self.versions = tuple(t._version for t in tensors)


class _Token:
    """What autograd keeps instead of a ``W_eff`` (or a view of it): the recipe and the view's geometry."""

    __slots__ = ("offset", "recompute", "size", "stride")

    def __init__(self, recompute: _Recompute, t: Tensor) -> None:
        self.recompute = recompute
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()


def mark(w_eff: Tensor, fn: Callable[[], Tensor], tensors: tuple[Tensor, ...]) -> None:
    """Declare that ``w_eff`` (fresh, offset 0) is ``fn()``, a pure function of ``tensors`` (weight, mask state):
    a saved reference to it (or to a view of it) may be dropped and rebuilt with ``fn`` in backward."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    setattr(w_eff, _ATTR, _Recompute(fn, tensors))


def _pack(t: Tensor) -> Any:
    base = t if t._base is None else t._base
    recompute = getattr(base, _ATTR, None)
    if recompute is None:
        return t
    return _Token(recompute, t)


def _unpack(saved: Any) -> Tensor:
    if not isinstance(saved, _Token):
        return saved
    recompute = saved.recompute
    if any(t._version != v for t, v in zip(recompute.tensors, recompute.versions)):
        raise RuntimeError(
            "maxq: a sparsified layer's weight or mask changed between its forward and backward (an optimizer "
            "step, sparsifier.step() or an in-place edit ran before backward()), so W * mask cannot be rebuilt for "
            "the gradient; call backward() before changing the weights or masks"
        )
    return recompute.fn().as_strided(saved.size, saved.stride, saved.offset)


def _stack() -> list[bool]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _enter(module: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = _stack()
    # Decide at the outermost call (or where every outer one stood aside): push ours if nobody else's are active.
    pushed = (
        not any(stack)
        and torch.is_grad_enabled()
        and torch._C._autograd._saved_tensors_hooks_is_enabled()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )
    if pushed:
        torch._C._autograd._push_saved_tensors_default_hooks(_pack, _unpack)
    stack.append(pushed)


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = _stack()
    if stack and stack.pop():
        torch._C._autograd._pop_saved_tensors_default_hooks()


def install(modules: list[nn.Module]) -> list[Any]:
    """Push the hooks around every call of each of ``modules`` (outermost call only); returns the hook handles."""
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(_enter))
        handles.append(module.register_forward_hook(_exit, always_call=True))
    return handles
