import pytest
import torch

from maxq._engine.fused import FusedState
from maxq.core.masks import block_l1, compute_mask_, dense_blocks, dense_count, hard_mask, maxq_mask
from maxq.core.nm import to_blocks
from maxq.core.reference import ref_dense_blocks, ref_maxq_mask

from ..conftest import PATTERNS, fused_params

SHAPES = [(16, 32, 3, 3), (24, 16), (8, 48, 1, 1), (6, 16, 5, 3)]


def compute_mask(w, n, m, *, fused=True, guess=None, **kw):
    """The mask of ``w`` and the fused state to pass back (the thresholds of this call)."""
    state = guess if guess is not None else FusedState()
    out = torch.empty_like(w)
    compute_mask_(out, w, n, m, fused=fused, state=state, **kw)
    return out, state


@pytest.mark.parametrize("fused", fused_params())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("p", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("order", ["smallest", "largest", "random"])
def test_mask_matches_reference(fused, shape, n, m, p, order):
    if shape[1] % m:
        pytest.skip("input not divisible")
    w = torch.randn(shape) * 0.05
    priority = torch.randperm(w.numel() // m).float()
    kw = dict(dense_fraction=p, order=order, priority=priority)
    ref = ref_maxq_mask(w, n, m, **kw)
    got, guess = compute_mask(w, n, m, fused=fused, **kw)
    assert torch.equal(got == 0, ref == 0)
    torch.testing.assert_close(got, ref)
    # The next step, with the thresholds of this one as guesses: still exact.
    w2 = w + 2e-3 * torch.randn_like(w)
    got2, _ = compute_mask(w2, n, m, fused=fused, guess=guess, **kw)
    ref2 = ref_maxq_mask(w2, n, m, **kw)
    assert torch.equal(got2 == 0, ref2 == 0)
    torch.testing.assert_close(got2, ref2)


@pytest.mark.parametrize("fused", fused_params())
@pytest.mark.parametrize("n, m", PATTERNS)
def test_mask_values_and_block_structure(fused, n, m):
    w = torch.randn(32, 64, 3, 3) * 0.05
    mask, _ = compute_mask(w, n, m, fused=fused)
    nonzero = mask[mask != 0]
    assert bool(((nonzero >= 1) & (nonzero <= 3)).all())
    assert torch.equal((to_blocks(mask, m) != 0).sum(-1), torch.full((w.numel() // m,), n))


@pytest.mark.parametrize("fused", fused_params())
def test_dense_fraction_endpoints(fused):
    w = torch.randn(16, 32, 3, 3)
    full, _ = compute_mask(w, 2, 4, dense_fraction=1.0, fused=fused)
    assert bool((full != 0).all())  # p = 1: no pruned block
    none, _ = compute_mask(w, 2, 4, dense_fraction=0.0, fused=fused)
    assert bool(((to_blocks(none, 4) != 0).sum(-1) == 2).all())  # p = 0: full N:M


@pytest.mark.parametrize("fused", fused_params())
def test_ties_resolved_like_reference(fused):
    w = torch.randint(-3, 4, (16, 32, 3, 3)).float() * 0.01
    ref = ref_maxq_mask(w, 2, 4)
    got, guess = compute_mask(w, 2, 4, fused=fused)
    assert torch.equal(got == 0, ref == 0)
    torch.testing.assert_close(got, ref)
    again, _ = compute_mask(w, 2, 4, fused=fused, guess=guess)
    torch.testing.assert_close(again, ref)


def test_soft_off_is_the_hard_mask():
    w = torch.randn(8, 16, 3, 3)
    assert torch.equal(maxq_mask(w, 2, 4, soft=False), hard_mask(w, 2, 4).float())


def test_dense_blocks_orders_match_reference():
    l1 = torch.randint(0, 20, (200,)).float()
    prio = torch.randperm(200).float()
    for order in ("smallest", "largest", "random"):
        for p in (0.0, 0.13, 0.5, 1.0):
            got = dense_blocks(l1, dense_count(p, 200), order, prio)
            assert torch.equal(got, ref_dense_blocks(l1, p, order, prio))
            assert int(got.sum()) == int(p * 200)


def test_dense_blocks_smallest_prefers_low_norm():
    w = torch.ones(2, 8)
    w[0, :4] = 0.1  # the low-norm block stays dense first
    l1 = block_l1(w.abs(), 4)
    dense = dense_blocks(l1, dense_count(0.25, 4), "smallest")
    assert dense.tolist() == [True, False, False, False]


def test_maxq_mask_validates():
    with pytest.raises(ValueError, match="tau"):
        maxq_mask(torch.randn(4, 8), 2, 4, tau=0)
    with pytest.raises(ValueError, match="divisible"):
        maxq_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="block order"):
        maxq_mask(torch.randn(4, 8), 2, 4, dense_fraction=0.5, order="middle")


# -- the soft factor's warm-up (our addition, METHOD.md §8) ----------------------------------------------------------


@pytest.mark.parametrize("fused", fused_params())
@pytest.mark.parametrize("n, m", [(2, 4), (1, 16)])
@pytest.mark.parametrize("p", [1.0, 0.4, 0.0])
def test_soft_warmup_ramp_is_the_reference_formula(fused, n, m, p):
    w = torch.randn(16, 32, 3, 3) * 0.05
    a = 1.0 - p
    ref = ref_maxq_mask(w, n, m, dense_fraction=p)
    hard = (ref != 0).float()
    got, _ = compute_mask(w, n, m, fused=fused, dense_fraction=p, strength=a)
    torch.testing.assert_close(got, a * ref + (1 - a) * hard)  # Mask = a * B(1 + Q_f + Q_k) + (1 - a) * B
    assert torch.equal(got != 0, ref != 0)  # the same weights survive
    if a == 0.0:
        assert torch.equal(got, hard)  # the hard mask times 1: the first forward of the ramp is the model itself


@pytest.mark.parametrize("fused", fused_params())
@pytest.mark.parametrize("p", [1.0, 0.0])
def test_soft_warmup_normalize_has_mean_one_over_kept_weights(fused, p):
    w = torch.randn(16, 32, 3, 3) * 0.05
    ref = ref_maxq_mask(w, 1, 16, dense_fraction=p)
    got, _ = compute_mask(w, 1, 16, fused=fused, dense_fraction=p, normalize=True)
    kept = got[got != 0]
    assert float(kept.double().mean()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(got != 0, ref != 0)
    torch.testing.assert_close(got, ref / ref[ref != 0].mean())


def test_soft_warmup_leaves_hard_masks_alone():
    w = torch.randn(8, 16) * 0.05
    hard = maxq_mask(w, 2, 4, soft=False)
    assert torch.equal(maxq_mask(w, 2, 4, soft=False, strength=0.3, normalize=True), hard)
    with pytest.raises(ValueError, match="strength"):
        maxq_mask(w, 2, 4, strength=1.5)
