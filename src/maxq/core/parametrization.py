"""The mask as a parametrization of a stock ``nn.Conv2d`` / ``nn.Linear`` / HF ``Conv1D`` weight: ``W -> W * mask``.

Attached with ``torch.nn.utils.parametrize``, so the model keeps its classes, ``module.weight`` stays the
effective (masked) weight, and the trainable tensor lives at ``module.parametrizations.weight.original``.
Folding ([`maxq.fold_`][maxq.fold_]) removes it with ``leave_parametrized=True``, keeping the parameter's identity.

The forward is ``W * mask`` and nothing else: no mask is computed in it (the sparsifier updates the mask state in
an explicit ``Sparsifier.step()``), so ``torch.compile`` traces it without graph breaks.

**Masks cost bits, not copies.** The parametrization holds the mask's *state*, not the mask: bit planes (one bit
per weight: kept or not; MaxQ's soft mask adds one bit per axis query) and the queries' thresholds (one float per
filter and per kernel position) -- [`maxq.core.masks.compute_state_`][maxq.core.masks.compute_state_]. A hard mask
that keeps exactly ``n`` of every block (SR-STE, one-shot) holds less still where it can: the positions of its kept
weights, ``ceil(log2 m)`` bits each (a quarter of a bit per weight at 1:16; [`maxq.core.codes`][maxq.core.codes]),
decoded one layer at a time when read. The forward
rebuilds ``W * mask`` from the weight and that state ([`maxq.core.masks.masked_weight`][maxq.core.masks.masked_weight],
bit for bit the product with the float mask), and the copy the layer's op saves for backward is dropped and
rebuilt when backward needs it ([`maxq.core.saving`][maxq.core.saving]). A one-shot (frozen) mask needs even less:
its pruned weights are held at exactly zero, so the forward hands the weight itself to the layer (``W * mask`` is
``W``, bit for bit) and only the gradient is masked, in place where it is not shared (as ASP does).

Two cases keep a weight-sized mask, as every mask was kept before: a soft mask updated less often than every
optimizer step (``update_every > 1``: its values belong to weights that have moved on since), and a soft mask
loaded from an older checkpoint, until its next update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._engine.fused import fused_available
from .bits import unpack_rows
from .codes import code_width, decode_kept, encode_kept_, uses_code
from .masks import (
    MaskSpec,
    join_pruned_,
    kept_row_chunks,
    masked_weight,
    materialize_mask,
    split_pruned_,
    state_shapes,
)
from .nm import _check_layout, oi_view
from .saving import mark
from .sharding import is_dtensor

__all__ = ["NMMask"]


class _StraightThrough(torch.autograd.Function):
    """``W * mask`` forward, identity backward: the gradient w.r.t. ``W`` is the one w.r.t. ``W * mask``."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _FromState(torch.autograd.Function):
    """``W * mask`` rebuilt from the mask state; identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, weight: Tensor, planes: Tensor, thresholds: Tensor, scale: Tensor, spec: MaskSpec) -> Tensor:
        return masked_weight(weight, planes, thresholds, scale, spec)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        return grad, None, None, None, None


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory once, in a layout the kernels walk (contiguous, channels_last, transposed)."""
    return (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 2 and t.t().is_contiguous())
    )


def mask_grad(grad: Tensor, planes: Tensor, input_axis: int) -> Tensor:
    """``grad * kept`` (the one-shot gradient: pruned weights get none), in place when ``grad`` is not shared with
    another consumer (as AccumulateGrad decides when it may steal a gradient), else a new tensor."""
    oi = oi_view(grad, input_axis)
    if torch.compiler.is_compiling():  # a functional graph: the compiler decides what runs in place
        return grad * oi_view(unpack_rows(planes[0], oi[0].numel()).view(oi.shape), input_axis)
    in_place = getattr(grad, "_use_count", lambda: 2)() == 1 and _dense(grad)
    if fused_available(grad):
        if not in_place:
            grad = grad.clone(memory_format=torch.contiguous_format)
            oi = oi_view(grad, input_axis)
        torch.ops.maxq.mask_grad_(oi, planes)
        return grad
    if not in_place:
        grad = grad.clone()
        oi = oi_view(grad, input_axis)
    for first, end, kept in kept_row_chunks(oi, planes):  # row chunks: a chunk's bool mask at a time
        oi[first:end].mul_(kept)
    return grad


class _Frozen(torch.autograd.Function):
    """A frozen mask whose pruned weights are exactly zero: the weight itself forward (``W * mask == W``, no copy),
    the masked gradient backward. ``coding``: ``(n, m)`` where ``state`` is a kept-index code, else ``None``."""

    @staticmethod
    def forward(ctx, weight: Tensor, state: Tensor, input_axis: int, coding: tuple[int, int] | None) -> Tensor:
        ctx.save_for_backward(state)
        ctx.input_axis, ctx.coding = input_axis, coding
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (planes,) = ctx.saved_tensors
        if ctx.coding is not None:  # decoded here, not in forward: held as the code until backward
            oi = oi_view(grad, ctx.input_axis)
            planes = decode_kept(planes, *ctx.coding, oi[0].numel(), oi[0, 0].numel())
        return mask_grad(grad, planes, ctx.input_axis), None, None, None


class NMMask(nn.Module):
    """Parametrization ``W -> W * mask`` of one layer, holding the mask's state.

    Args:
        shape: the weight's stored shape, ``[O, I]``, ``[O, I, kh, kw]`` or (``input_axis=0``) ``[I, O]``.
        n, m: the layer's N:M pattern.
        straight_through: identity gradient (STE: pruned weights keep learning) instead of the masked gradient.
        input_axis: the axis of the stored weight holding the inputs
            ([`input_axis`][maxq.core.layers.input_axis]).
        soft: the mask carries MaxQ's axis queries (``1 + Q_f + Q_k`` on kept weights).
        tau: the queries' temperature.
        frozen: the mask never changes and the pruned weights are held at zero (one-shot).
        exact: every block keeps exactly ``n`` weights, always (no dense blocks: SR-STE, one-shot); a hard mask
            then holds a kept-index code where it is smaller than the bit plane ([`maxq.core.codes`][maxq.core.codes]).

    Buffers (not persistent: the model's ``state_dict`` holds weights only; the state travels in
    ``Sparsifier.state_dict()``): ``planes`` (uint8 ``[P, O, ceil(I * kh * kw / 8)]``, or where
    [`coded`][maxq.core.parametrization.NMMask.coded] the code ``[1, O, code_width]``; read the bit planes through
    [`bit_planes`][maxq.core.parametrization.NMMask.bit_planes]), ``thresholds`` (float32 ``[2*O + 2*K]``, soft
    masks), ``scale`` (float32 ``[strength, divisor]`` of the soft factor's warm-up), and ``mask`` (a weight-sized
    mask, only in the two cases the module docstring names; else empty).
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        n: int,
        m: int,
        *,
        straight_through: bool,
        input_axis: int = 1,
        soft: bool = False,
        tau: float = 0.01,
        frozen: bool = False,
        exact: bool = False,
    ) -> None:
        super().__init__()
        _check_layout(tuple(oi_view(torch.empty(shape, device="meta"), input_axis).shape), m)
        self.n, self.m = n, m
        self.shape = tuple(shape)
        self.input_axis = input_axis
        self.straight_through = straight_through
        self.frozen = frozen
        self.spec = MaskSpec(n, m, soft, tau, input_axis)
        planes, count = state_shapes(tuple(shape), soft, input_axis)
        self.planes_shape: tuple[int, ...] = planes
        oi = self.oi_shape
        self._length, self._kernel = math.prod(oi[1:]), math.prod(oi[2:])
        #: the kept weights are held as a kept-index code, not a bit plane
        self.coded = uses_code(n, m, soft, exact)
        if self.coded:
            planes = (1, planes[1], code_width(self._length, n, m))
        self.register_buffer("planes", torch.zeros(planes, dtype=torch.uint8), persistent=False)
        # float32 values held as their int32 bits: `model.to(torch.bfloat16)` casts floating buffers, and these must
        # keep their precision (thresholds, warm-up scale); read them through `thresholds_f32` / `scale_f32`.
        self.register_buffer("thresholds", torch.zeros(count).view(torch.int32), persistent=False)
        self.register_buffer("scale", torch.ones(2).view(torch.int32), persistent=False)
        self.register_buffer("mask", torch.zeros(0), persistent=False)
        # [weight storage, stash, users] while backward holds the weight masked in place (`_split`), else None
        self._held: list | None = None

    @property
    def thresholds_f32(self) -> Tensor:
        """The queries' thresholds as float32 ``[2*O + 2*K]`` (a view of the ``thresholds`` buffer)."""
        return self.thresholds.view(torch.float32)

    @property
    def scale_f32(self) -> Tensor:
        """``[strength, divisor]`` of the soft factor's warm-up as float32 (a view of the ``scale`` buffer)."""
        return self.scale.view(torch.float32)

    def bit_planes(self, whole: bool = False) -> Tensor:
        """The mask's bit planes, uint8 ``[P, O, ceil(L / 8)]``: this rank's rows where the state is sharded, unless
        ``whole`` (then gathered: a collective). Decoded from the kept-index code where one is held (a new tensor,
        one layer's bits), else the state itself."""
        state = self._full(self.planes) if whole else self._local(self.planes)
        return decode_kept(state, self.n, self.m, self._length, self._kernel) if self.coded else state

    def store_bits_(self, planes: Tensor) -> None:
        """Write bit planes (uint8 ``[P, O, ceil(L / 8)]``, this rank's rows) into the state (encoded where it is a
        code: every block must keep exactly ``n``)."""
        state = self._local(self.planes)
        if self.coded:
            encode_kept_(state, planes.to(state.device), self.n, self.m, self._length, self._kernel)
        else:
            state.copy_(planes)

    def new_bit_planes(self) -> Tensor:
        """Uninitialised bit planes for this rank's rows (where a state update writes before `store_bits_`)."""
        local = self._local(self.planes)
        return local.new_empty((self.planes_shape[0], local.shape[1], self.planes_shape[2]))

    @property
    def materialized(self) -> bool:
        """Whether a weight-sized mask is held (``update_every > 1`` with a soft mask, or a legacy state)."""
        return self.mask.numel() > 0

    # -- sharded weights (FSDP2): the state holds this rank's rows; the forward sees the whole weight --------------
    def _full(self, t: Tensor) -> Tensor:
        """A state tensor whole (``t`` itself, or the gathered DTensor: a collective)."""
        return t.full_tensor() if is_dtensor(t) else t

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        return t.to_local() if is_dtensor(t) else t

    def forward(self, weight: Tensor) -> Tensor:
        if self._held is not None:
            self.restore_()
        if self.materialized:
            mask = self._full(self.mask)
            if not self.straight_through:
                return weight * mask
            w_eff = _StraightThrough.apply(weight, mask)
            mark(w_eff, lambda: _StraightThrough.apply(weight, self._full(self.mask)), (weight, self._local(self.mask)))
            return w_eff
        if self.frozen:
            coding = (self.n, self.m) if self.coded else None
            return _Frozen.apply(weight, self._full(self.planes), self.input_axis, coding)
        w_eff = self._from_state(weight)
        # Rebuilt in backward (with a graph under create_graph=True, so higher-order gradients still flow); a hard
        # mask on a plain weight parameter masks the weight itself in place there instead (no second copy).
        versions = (weight, self._local(self.planes), self.thresholds, self.scale)
        in_place = None if self.spec.soft else lambda: self._split(weight)
        mark(w_eff, lambda: self._from_state(weight), versions, in_place)
        return w_eff

    def _split(self, weight: Tensor) -> tuple[Tensor, Callable[[], None]] | None:
        """``weight`` masked in place (``W * mask``, bit for bit) with its pruned values stashed, for one backward
        node; returns its storage and the release that restores it when the last such node is done. None (rebuild
        instead) unless the weight is a plain parameter in a layout the kernels walk (decided here, in backward,
        not on every forward)."""
        if not weight.is_leaf or not _dense(weight) or is_dtensor(self.planes):
            return None
        held = self._held
        if held is None:
            storage = weight.data  # its own version counter: autograd's check of the weight is not disturbed
            planes = self.bit_planes()  # kept (decoded once) until the weight is joined again
            stash = split_pruned_(oi_view(storage, self.input_axis), planes, self.n, self.m)
            held = self._held = [storage, stash, 0, planes]
        elif held[0].data_ptr() != weight.data_ptr() or held[0].shape != weight.shape:
            return None  # another tensor's split is live (not seen in practice): rebuild instead
        held[2] += 1
        return held[0], self._release

    def _release(self) -> None:
        held = self._held
        if held is None:  # already put back by restore_()
            return
        held[2] -= 1
        if held[2] == 0:
            self.restore_()

    def restore_(self) -> None:
        """Put back the pruned values of a weight that backward holds masked in place (a no-op when none is): a
        backward node that failed leaves it so, and the next forward, ``Sparsifier.step()`` or ``regularize_()``
        calls this before reading the weight."""
        held, self._held = self._held, None
        if held is not None:
            join_pruned_(oi_view(held[0], self.input_axis), held[3], held[1])

    def _from_state(self, weight: Tensor) -> Tensor:
        return _FromState.apply(weight, self.bit_planes(whole=True), self.thresholds_f32, self.scale_f32, self.spec)

    def effective(self, weight: Tensor) -> Tensor:
        """``W * mask`` as the forward computes it (no gradient; a sharded weight is gathered: a collective)."""
        weight = self._full(weight.detach())
        if self.materialized:
            with torch.no_grad():
                return weight * self._full(self.mask)
        if self.frozen:  # the pruned weights are zero: W * mask is W (a copy, for callers that keep it)
            return weight.clone()
        return masked_weight(weight, self.bit_planes(whole=True), self.thresholds_f32, self.scale_f32, self.spec)

    def effective_local(self, local: Tensor, offset: int) -> Tensor:
        """``W * mask`` of this rank's rows of a sharded weight (``local``: the rows from ``offset`` on, stored layout;
        no collective), as the forward would compute them on the whole weight."""
        with torch.no_grad():
            if self.materialized:
                return local * self._local(self.mask)
            if self.frozen:
                return local.detach().clone()
            thresholds = self.thresholds_f32
            if self.spec.soft:  # this rank's rows' thresholds, then the kernel sets' (whole)
                rows, count = self.oi_shape[0], oi_view(local, self.input_axis).shape[0]
                thresholds = torch.cat(
                    [
                        thresholds[offset : offset + count],
                        thresholds[rows + offset : rows + offset + count],
                        thresholds[2 * rows :],
                    ]
                )
            return masked_weight(local, self.bit_planes(), thresholds, self.scale_f32, self.spec)

    def mask_for(self, weight: Tensor) -> Tensor:
        """The mask the next forward multiplies ``weight`` by: stored shape and layout, the weight's dtype (a new
        tensor; 0 on pruned weights, ``>= 1`` on kept ones). Whole, for a sharded weight too (a collective)."""
        with torch.no_grad():
            if self.materialized:
                return self._full(self.mask).clone()
            weight = self._full(weight.detach())
            planes = self.bit_planes(whole=True)
            if not self.spec.soft:
                oi = oi_view(weight, self.input_axis)
                keep = unpack_rows(planes[0], oi[0].numel()).view(oi.shape)
                return oi_view(keep, self.input_axis).to(weight.dtype).contiguous()
            mask = materialize_mask(weight, planes, self.thresholds_f32, self.scale_f32, self.spec)
            return oi_view(mask, self.input_axis).to(weight.dtype).contiguous()

    @property
    def oi_shape(self) -> tuple[int, ...]:
        """The weight's ``[O, I(, kh, kw)]`` shape (whole)."""
        return (self.shape[1], self.shape[0]) if self.input_axis == 0 else self.shape

    def kept(self, whole: bool = False) -> Tensor:
        """Bool ``[O, I(, kh, kw)]``: the weights the mask keeps (a new tensor); of this rank's rows where the state
        is sharded, unless ``whole`` (then gathered: a collective)."""
        planes = self.bit_planes(whole)
        shape = (planes.shape[1], *self.oi_shape[1:])
        return unpack_rows(planes[0], math.prod(shape[1:])).view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the mask state this module holds on this rank (every buffer; a sharded one's local part)."""
        return sum(self._local(b).numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        axis = ", input_axis=0" if self.input_axis == 0 else ""
        kind = "frozen" if self.frozen else ("soft" if self.spec.soft else "hard")
        code = ", kept-index code" if self.coded else ""
        return f"{self.n}:{self.m}, {kind}, straight_through={self.straight_through}{axis}{code}"
