"""The lean mask's kernels against the float mask writer they replace: the state the fused kernel writes (bit
planes, thresholds), turned back into a mask or into ``W * mask`` by ``apply_``, equals bit for bit the float
mask ``mask_`` writes in one go, on every layout, pattern, ramp stage and with ties at the queries' cuts."""

from __future__ import annotations

import pytest
import torch

from maxq._engine.kernels import cpu_kernels
from maxq.core.masks import MaskSpec, compute_state_, masked_weight, materialize_mask, state_shapes
from maxq.core.nm import oi_view

from ..conftest import PATTERNS

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="fused CPU kernels unavailable")

SHAPES = [(16, 32), (24, 16, 3, 3), (32, 48, 1, 1), (8, 64, 5, 1)]


def _weight(shape, ties: bool) -> torch.Tensor:
    w = torch.randn(shape)
    if ties:  # few distinct magnitudes: ties at every cut
        w = (w * 2).round() / 2
    return w


def _float_mask(w: torch.Tensor, n: int, m: int, count: int, soft: bool) -> torch.Tensor:
    o, i = w.shape[0], w.shape[1]
    k = w.numel() // (o * i)
    out = torch.empty_like(w)
    state = torch.full((2 * o + 2 * k + 2,), float("nan"))
    torch.ops.maxq.mask_(w.contiguous(), out, state, n, m, soft, 0.01, count, 0, None, None, None)
    return out


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
def test_state_then_apply_equals_the_float_mask_bit_for_bit(shape, n, m, fraction, ties, soft):
    if shape[1] % m:
        pytest.skip("input size not divisible by m")
    torch.manual_seed(hash((shape, n, m)) % 1000)
    w = _weight(shape, ties)
    blocks = w.numel() // m
    expected = _float_mask(w, n, m, int(fraction * blocks), soft)
    planes_shape, count = state_shapes(tuple(w.shape), soft)
    planes = torch.zeros(planes_shape, dtype=torch.uint8)
    thresholds = torch.zeros(count)
    assert compute_state_(planes, thresholds, w, n, m, dense_fraction=fraction, soft=soft)
    spec = MaskSpec(n, m, soft, 0.01, 1, True)
    mask = materialize_mask(w, planes, thresholds, torch.ones(2), spec)
    assert torch.equal(mask.view(torch.int32), expected.view(torch.int32))
    effective = masked_weight(w, planes, thresholds, torch.ones(2), spec)
    assert torch.equal(effective.view(torch.int32), (w * expected).view(torch.int32))
    # The device-agnostic path writes the same state (bits and thresholds).
    planes2, thresholds2 = torch.zeros_like(planes), torch.zeros_like(thresholds)
    assert not compute_state_(planes2, thresholds2, w, n, m, dense_fraction=fraction, soft=soft, fused=False)
    assert torch.equal(planes, planes2) and torch.equal(thresholds, thresholds2)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_apply_walks_any_layout(layout):
    torch.manual_seed(0)
    if layout == "channels_last":
        w = torch.randn(16, 32, 3, 3).to(memory_format=torch.channels_last)
        axis = 1
    else:
        w = torch.randn(32, 16)  # a Conv1D weight [in, out]: its [O, I] view is transposed
        axis = 0
    oi = oi_view(w, axis)
    planes_shape, count = state_shapes(tuple(w.shape), True, axis)
    planes, thresholds = torch.zeros(planes_shape, dtype=torch.uint8), torch.zeros(count)
    compute_state_(planes, thresholds, oi, 2, 4)
    spec = MaskSpec(2, 4, True, 0.01, axis, True)
    effective = masked_weight(w, planes, thresholds, torch.ones(2), spec)
    expected = oi_view(_float_mask(oi.contiguous(), 2, 4, 0, True), axis)
    assert effective.stride() == w.stride()  # the weight's layout, as W * mask had
    assert torch.equal(effective, w * expected)


@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
def test_the_apply_op_takes_an_out_laid_out_unlike_the_weight(soft):
    """A compiler may hand the op an ``out`` in its preferred layout (PyTorch 2.4's inductor: channels_last for a
    conv weight); the op writes the same values into it."""
    if cpu_kernels() is None:
        pytest.skip("fused CPU kernels unavailable")
    torch.manual_seed(0)
    w = torch.randn(16, 32, 3, 3)
    planes_shape, count = state_shapes(tuple(w.shape), soft)
    planes, thresholds = torch.zeros(planes_shape, dtype=torch.uint8), torch.zeros(count)
    compute_state_(planes, thresholds, w, 2, 4, soft=soft)
    thr = thresholds if soft else None
    same, other = torch.empty_like(w), torch.empty_like(w, memory_format=torch.channels_last)
    torch.ops.maxq.apply_(w, planes, thr, soft, 0.01, 1, same, 2, 4)
    torch.ops.maxq.apply_(w, planes, thr, soft, 0.01, 1, other, 2, 4)
    assert other.stride() != w.stride() and torch.equal(other, same)
    with pytest.raises(RuntimeError, match="strides"):  # the kernel itself still insists on the weight's walk
        cpu_kernels().apply_(w, planes, thr, soft, 0.01, 1, other, 2, 4)
