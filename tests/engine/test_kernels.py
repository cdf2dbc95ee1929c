"""The fused CPU kernels against plain PyTorch (the mask-level equivalence is in test_masks.py)."""

import pytest
import torch

from maxq._engine.kernels import cpu_kernels, kernels_enabled
from maxq.core.queries import pruned_count

ext = cpu_kernels()
pytestmark = pytest.mark.skipif(ext is None, reason="fused CPU kernels unavailable (no compiler or disabled)")


def test_enabled_flag(monkeypatch):
    monkeypatch.setenv("MAXQ_CPU_KERNELS", "0")
    assert not kernels_enabled()
    monkeypatch.setenv("MAXQ_CPU_KERNELS", "1")
    assert kernels_enabled()


@pytest.mark.parametrize("axis", [0, 1])
def test_kth_select_exact_for_any_offset(axis):
    w = torch.randn(64, 32, 3, 3) * 0.05
    sets = w.abs().reshape(64, -1) if axis == 1 else w.abs().reshape(-1, 9).t()
    k = pruned_count(sets.shape[1], 1, 4)
    s = sets.sort(dim=1).values
    want_lo, want_hi = s[:, k - 1], s[:, k]
    for shift in (-40, -3, 0, 1, 25):  # guess this many ranks off
        guess = s[:, k - 1 + shift].contiguous()
        count = (sets < guess[:, None]).sum(1)
        lo, hi, ok, width = ext.kth_select(w, axis, k, guess, count, 4096, None)
        assert bool(ok.all())
        assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
        lo2, hi2, _, _ = ext.kth_select(w, axis, k, guess, count, 4096, width)  # with the width hint
        assert torch.equal(lo2, want_lo) and torch.equal(hi2, want_hi)
    # Too far off: left to the caller.
    guess = s[:, 0].contiguous()
    count = (sets < guess[:, None]).sum(1)
    assert not bool(ext.kth_select(w, axis, k, guess, count, 5, None)[2].any())


def test_decay_touches_pruned_only():
    w, grad = torch.randn(8, 16), torch.randn(8, 16)
    mask = (torch.rand(8, 16) > 0.5).float() * 2
    expected = grad + 0.1 * w * (mask == 0)
    ext.decay_(grad, w, mask, 0.1)
    torch.testing.assert_close(grad, expected)


def test_soft_scale_matches_torch():
    w = torch.randn(4, 8, 3, 3) * 0.05
    a = w.abs()
    mask = (torch.rand_like(w) > 0.5).float()
    tf, cf = torch.rand(4) * 0.05, torch.rand(4) * 0.04
    tk, ck = torch.rand(9) * 0.05, torch.rand(9) * 0.04
    expected = mask * (
        1
        + (a > cf.view(4, 1, 1, 1)) * torch.sigmoid((a - tf.view(4, 1, 1, 1)) / 0.01)
        + (a > ck.view(1, 1, 3, 3)) * torch.sigmoid((a - tk.view(1, 1, 3, 3)) / 0.01)
    )
    ext.soft_scale_(w, mask, tf, cf, tk, ck, 0.01)
    torch.testing.assert_close(mask, expected)


def test_rejects_wrong_inputs():
    with pytest.raises(RuntimeError, match="float32"):
        ext.decay_(torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), 0.1)
