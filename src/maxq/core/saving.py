"""Keep ``W * mask`` out of the autograd graph: recompute it in backward instead of keeping it from the forward.

A masked layer computes ``W_eff = W * mask`` and hands it to its op (``F.linear``, ``F.conv2d``, ``torch.addmm``),
which saves it for backward (the gradient of the layer's input needs it). Kept from forward to backward, that
copy costs as much memory as the weight itself. While a sparsified model runs its forward, maxq installs
saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) that replace such a saved ``W_eff`` (or a view
of it) by a small token, and rebuild it from ``W`` and the mask state when backward asks for it: the same bits,
since the mask state and the weight have not changed in between (checked with their version counters, as autograd
checks what it saves).

Rebuilt, ``W_eff`` still costs one layer's weight bytes while that layer's backward runs. A hard 0/1 mask needs
less: the weight itself becomes ``W_eff`` for the moment the op's backward node runs -- its pruned values copied
out (the pruned share of the weight, e.g. half for 2:4), zeroed in place, and written back by a hook that runs as
the node returns (`maxq.core.masks.split_pruned_`). Nothing else runs in between: the window is the one node. (If
the node fails, the weight is put back by the layer's next forward or the sparsifier's next call.)

The hooks are pushed by forward pre-hooks on the sparsified model and on each sparsified layer (so a layer called on
its own is covered too) and popped by their forward hooks (``always_call``), once per outermost call. They stand
aside when:

* ``torch.compile`` is tracing: the compiler's partitioner decides what to save (``W * mask`` is cheap to
  recompute and it usually does);
* gradients are off (nothing is saved);
* someone else's saved-tensor hooks are active (activation checkpointing, offloading): only the innermost hooks
  run, so pushing ours would hide every other saved tensor from theirs. Their recomputation covers ``W_eff`` too;
* PyTorch cannot say whether someone else's are active (no ``torch._C._autograd._top_saved_tensors_default_hooks``:
  2.4 has none): the op then keeps ``W_eff`` as it would without maxq.
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
# What returns the innermost saved-tensor hooks; None where this PyTorch has no such query (ours then stand aside)
_TOP_HOOKS: Callable[..., Any] | None = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _no_other_hooks() -> bool:
    """Whether no saved-tensor hooks are active; False where PyTorch cannot say."""
    if _TOP_HOOKS is None:
        return False
    try:
        return _TOP_HOOKS(False) is None  # (ignore_is_tracing)
    except TypeError:  # versions whose query takes no argument
        return _TOP_HOOKS() is None


#: ``in_place()`` of `mark`: the weight's storage holding ``W_eff`` (or None: rebuild instead) and the call that
#: puts the weight back as the backward node that uses it returns.
InPlace = Callable[[], "tuple[Tensor, Callable[[], None]] | None"]


class _Recompute:
    """How to rebuild one ``W_eff``: the function, the tensors whose version counters must not have moved, and
    (hard masks) how to mask the weight in place instead."""

    __slots__ = ("fn", "in_place", "tensors", "versions")

    def __init__(self, fn: Callable[[], Tensor], tensors: tuple[Tensor, ...], in_place: InPlace | None) -> None:
        self.fn = fn
        self.tensors = tensors
        self.versions = tuple(t._version for t in tensors)
        self.in_place = in_place


class _Token:
    """What autograd keeps instead of a ``W_eff`` (or a view of it): the recipe and the view's geometry."""

    __slots__ = ("offset", "recompute", "size", "stride")

    def __init__(self, recompute: _Recompute, t: Tensor) -> None:
        self.recompute = recompute
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()


def mark(w_eff: Tensor, fn: Callable[[], Tensor], tensors: tuple[Tensor, ...], in_place: InPlace | None = None) -> None:
    """Declare that ``w_eff`` (fresh, offset 0) is ``fn()``, a pure function of ``tensors`` (weight, mask state):
    a saved reference to it (or to a view of it) may be dropped and rebuilt with ``fn`` in backward.

    ``in_place``, where given, may instead turn the weight itself into ``W_eff`` for the op's backward node: it
    returns the weight's storage (holding ``W_eff`` bit for bit, in ``w_eff``'s layout) and a ``release`` that
    restores the weight, which runs as that node returns (a post hook of the node), before any other node runs."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    setattr(w_eff, _ATTR, _Recompute(fn, tensors, in_place))


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
    # Masked in place only inside a backward node that builds no graph of its own (create_graph=False: grad mode
    # is off), and put back by a hook that runs as that node returns: a graph, or a caller outside backward,
    # would keep the masked weight for longer.
    node = torch._C._current_autograd_node() if recompute.in_place is not None else None
    held = recompute.in_place() if node is not None and not torch.is_grad_enabled() else None
    if held is None:
        return recompute.fn().as_strided(saved.size, saved.stride, saved.offset)
    storage, release = held
    handle = None

    def done(grad_inputs: Any, grad_outputs: Any) -> None:
        handle.remove()
        release()

    handle = node.register_hook(done)
    return storage.as_strided(saved.size, saved.stride, storage.storage_offset() + saved.offset)


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
        and _no_other_hooks()
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
