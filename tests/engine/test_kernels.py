"""The fused CPU kernel against the full-sort reference, whatever its remembered thresholds say (the mask-level
equivalence over every shape and pattern is in tests/core/test_masks.py)."""

import pytest
import torch

from maxq._engine.fused import FusedState
from maxq._engine.kernels import cpu_kernels, kernels_enabled
from maxq.core.masks import compute_mask_, dense_count
from maxq.core.reference import ref_maxq_mask

from ..conftest import PATTERNS

ext = cpu_kernels()
pytestmark = pytest.mark.skipif(ext is None, reason="fused CPU kernels unavailable (no compiler or disabled)")

SHAPES = [(32, 64, 3, 3), (48, 32), (16, 32, 1, 1), (8, 16, 5, 5)]


def test_enabled_flag(monkeypatch):
    monkeypatch.setenv("MAXQ_CPU_KERNELS", "0")
    assert not kernels_enabled()
    monkeypatch.setenv("MAXQ_CPU_KERNELS", "1")
    assert kernels_enabled()


def _fused(w, n, m, state, **kw):
    out = torch.empty_like(w)
    compute_mask_(out, w, n, m, state=state, fused=True, **kw)
    return out


def _check(got, w, n, m, **kw):
    ref = ref_maxq_mask(w, n, m, **kw)
    assert torch.equal(got == 0, ref == 0)  # the same surviving weights
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_consecutive_updates_use_the_guess_and_stay_exact(shape, n, m, p):
    if shape[1] % m:
        pytest.skip("input not divisible")
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    priority = torch.randperm(w.numel() // m).float()
    state = FusedState()
    kw = dict(dense_fraction=p, order="smallest", priority=priority)
    _check(_fused(w, n, m, state, **kw), w, n, m, **kw)  # first update: no guess, exact selection
    missed = 0
    for _ in range(6):  # training-like drift: the thresholds move a little
        w = w + 1e-3 * torch.randn_like(w)
        _check(_fused(w, n, m, state, **kw), w, n, m, **kw)
        missed += int(state.fallbacks.sum())
    # Once the brackets have adapted, every set is solved around its guess (the exact path is the exception).
    assert state.fallbacks.tolist() == [0, 0, 0]
    assert missed <= shape[0] // 4


@pytest.mark.parametrize("order", ["smallest", "largest", "random"])
def test_dense_orders_with_guess(order):
    torch.manual_seed(1)
    w = torch.randn(32, 64, 3, 3) * 0.05
    priority = torch.randperm(w.numel() // 4).float()
    state = FusedState()
    for p in (0.8, 0.8, 0.6, 0.25, 0.25):
        kw = dict(dense_fraction=p, order=order, priority=priority)
        got = _fused(w, 2, 4, state, **kw)
        _check(got, w, 2, 4, **kw)
        assert int(((got != 0).view(32, 16, 4, 9).sum(2) > 2).sum()) == dense_count(p, w.numel() // 4)
        w = w + 1e-3 * torch.randn_like(w)


@pytest.mark.parametrize("kind", ["zero", "huge", "negative", "nan", "tiny width", "huge width", "shifted"])
def test_any_remembered_state_gives_the_exact_mask(kind):
    torch.manual_seed(2)
    w = torch.randn(24, 32, 3, 3) * 0.05
    kw = dict(dense_fraction=0.3, order="smallest")
    state = FusedState()
    _fused(w, 1, 4, state, **kw)
    t = state.tensor
    o, k = 24, 9
    guesses = torch.cat([t[:o], t[2 * o : 2 * o + k], t[-2:-1]])
    widths = torch.cat([t[o : 2 * o], t[2 * o + k : 2 * o + 2 * k], t[-1:]])
    if kind == "zero":
        guesses.zero_()
    elif kind == "huge":
        guesses.fill_(1e30)
    elif kind == "negative":
        guesses.fill_(-1.0)
    elif kind == "nan":
        guesses.fill_(float("nan"))
    elif kind == "tiny width":
        widths.fill_(1e-30)
    elif kind == "huge width":
        widths.fill_(1e30)
    else:
        guesses.mul_(1.05)
    t[:o], t[2 * o : 2 * o + k], t[-2] = guesses[:o], guesses[o : o + k], guesses[-1]
    t[o : 2 * o], t[2 * o + k : 2 * o + 2 * k], t[-1] = widths[:o], widths[o : o + k], widths[-1]
    _check(_fused(w, 1, 4, state, **kw), w, 1, 4, **kw)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_ties_follow_the_index_rule(p):
    w = torch.randint(-3, 4, (16, 32, 3, 3)).float() * 0.01  # many equal magnitudes: ties at every cut
    state = FusedState()
    kw = dict(dense_fraction=p, order="smallest")
    for _ in range(2):  # without and with a guess
        _check(_fused(w, 2, 4, state, **kw), w, 2, 4, **kw)


def test_channels_last_weight():
    w = torch.randn(16, 32, 3, 3).to(memory_format=torch.channels_last) * 0.05
    out = torch.empty_like(w)
    assert not out.is_contiguous()
    compute_mask_(out, w, 2, 4, state=FusedState())
    _check(out, w, 2, 4)


def test_decay_touches_pruned_only():
    w, grad = torch.randn(8, 16), torch.randn(8, 16)
    mask = (torch.rand(8, 16) > 0.5).float() * 2
    expected = grad + 0.1 * w * (mask == 0)
    torch.ops.maxq.decay_(grad, w, mask, 0.1)
    torch.testing.assert_close(grad, expected)


def test_ops_trace_under_compile():
    w = torch.randn(16, 32, 3, 3) * 0.05
    state = torch.full((2 * 16 + 2 * 9 + 2,), float("nan"))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def update(w, mask, state):
        torch.ops.maxq.mask_(w, mask, state, 2, 4, True, 0.01, 0, 0, None, None, None)
        return mask.sum()

    mask = torch.empty_like(w)
    update(w, mask, state)
    _check(mask, w, 2, 4)


def test_ops_bump_the_version_of_what_they_write_and_only_that():
    """Autograd's saved-tensor checks (a mask changed between forward and backward) rely on these bumps."""
    w, grad, mask = torch.randn(8, 16), torch.randn(8, 16), torch.ones(8, 16)
    planes = torch.zeros(1, 8, 2, dtype=torch.uint8)
    before = (grad._version, w._version, mask._version, planes._version)
    torch.ops.maxq.decay_(grad, w, mask, 0.1)
    torch.ops.maxq.mask_grad_(grad, planes)
    assert (grad._version, w._version, mask._version, planes._version) == (before[0] + 2, *before[1:])
    out = torch.empty(8, 16)
    versions = (w._version, out._version)
    torch.ops.maxq.apply_(w, torch.full((1, 8, 2), 255, dtype=torch.uint8), None, False, 0.01, 0, out, 2, 4)
    assert (w._version, out._version) == (versions[0], versions[1] + 1)


def test_rejects_wrong_inputs():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.maxq.decay_(torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), 0.1)
    with pytest.raises(RuntimeError, match="state"):
        torch.ops.maxq.mask_(
            torch.randn(4, 8), torch.empty(4, 8), torch.empty(3), 2, 4, True, 0.01, 0, 0, None, None, None
        )


def test_the_build_line_is_said_only_when_a_build_happens(caplog, monkeypatch):
    import logging
    from pathlib import Path

    from maxq._engine import kernels

    module = cpu_kernels()
    assert (Path(module.__file__).parent / kernels.BUILT_STAMP).is_file()  # built and finished: loaded directly
    monkeypatch.setattr(kernels, "_state", {})  # load again, from the cache
    monkeypatch.setattr(kernels, "_register_ops", lambda ext: None)  # the ops are registered already
    with caplog.at_level(logging.DEBUG, logger="maxq"):
        assert kernels.cpu_kernels() is not None
    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not any("build" in m or "30 s" in m for m in infos), infos
    assert any("built before" in r.getMessage() for r in caplog.records)
