"""SparseGPT against the plain column-by-column reference (explicit inverses, no Cholesky, no lazy batches), and
its properties: exactly N:M, lower reconstruction error than Wanda and magnitude, a loss estimate that is the
measured error, dead inputs."""

import pytest
import torch

from maxq.calibrate import magnitude_prune, sparsegpt_prune, wanda_prune
from maxq.calibrate.sparsegpt import inverse_hessian_factor
from tests.calibrate.reference import ref_hessian, ref_magnitude, ref_sparsegpt
from tests.conftest import PATTERNS

SHAPES = [(8, 16), (6, 32), (16, 16), (5, 48)]


def calibration_inputs(rows: int, cols: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Correlated inputs with very different feature scales (what makes calibration matter in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randn(rows, cols // 2, generator=g) @ torch.randn(cols // 2, cols, generator=g)
    x = mixed + 0.3 * torch.randn(rows, cols, generator=g)
    return (x * torch.exp(torch.randn(cols, generator=g))).to(dtype)


def weight(rows: int, cols: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)


def blocks_kept(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("blocksize_blocks", [1, 64])  # N:M blocks per lazy-update block (64: a single block)
def test_matches_reference(shape, n, m, blocksize_blocks):
    rows, cols = shape
    if cols % m:
        pytest.skip("pattern does not divide the inputs")
    x = calibration_inputs(3 * cols, cols, seed=cols + n)
    w = weight(rows, cols, seed=rows + m)
    h = ref_hessian(x)
    got, keep, _ = sparsegpt_prune(w, h, n, m, blocksize=blocksize_blocks * m)
    want = ref_sparsegpt(w, h, n, m)
    assert torch.equal(keep, want != 0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (blocks_kept(got, m) == n).all()  # exactly N:M, pruned weights exact zeros


@pytest.mark.parametrize("n, m", PATTERNS)
def test_float32_close_to_reference(n, m):
    x = calibration_inputs(96, 32, seed=1)
    w = weight(12, 32, seed=2)
    got, keep, _ = sparsegpt_prune(w.float(), ref_hessian(x).float(), n, m, blocksize=2 * m)
    assert got.dtype == torch.float32 and (blocks_kept(got, m) <= n).all()
    assert (keep.reshape(12, -1, m).sum(-1) == n).all()
    want = ref_sparsegpt(w, ref_hessian(x), n, m)
    assert (keep == (want != 0)).float().mean() > 0.97  # near-ties may flip in float32
    err = torch.linalg.matrix_norm(x.float() @ (w.float() - got).t())
    ref_err = torch.linalg.matrix_norm(x @ (w - want).t())
    assert float(err) == pytest.approx(float(ref_err), rel=0.05)


def error(x: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> float:
    """The layer's reconstruction error on the calibration inputs, ||X W^T - X W'^T||_F."""
    return float(torch.linalg.matrix_norm(x @ (w - pruned).t()))


def errors(seed: int, shape: tuple[int, int], n: int, m: int) -> dict[str, float]:
    rows, cols = shape
    x = calibration_inputs(4 * cols, cols, seed)
    w = weight(rows, cols, seed)
    sparse, _, _ = sparsegpt_prune(w, ref_hessian(x), n, m)
    wanda, _ = wanda_prune(w, x.square().mean(0), n, m)
    magnitude, _ = magnitude_prune(w, n, m)
    return {"sparsegpt": error(x, w, sparse), "wanda": error(x, w, wanda), "magnitude": error(x, w, magnitude)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_reconstruction_error_below_wanda_and_magnitude(shape, n, m):
    """SparseGPT reconstructs the kept weights, so its layer error is below magnitude's in every case and below
    Wanda's at 50% sparsity in every case; at 75% its greedy left-to-right choice loses the odd case to Wanda
    (measured: up to 1.2x on 16 inputs at 2:8), so there the claim is on the mean over seeds."""
    runs = [errors(seed, shape, n, m) for seed in range(5)]
    for e in runs:
        assert e["sparsegpt"] < e["magnitude"]
        if n / m == 0.5:
            assert e["sparsegpt"] < e["wanda"]
    ratio = sum(e["sparsegpt"] / e["wanda"] for e in runs) / len(runs)
    assert ratio < 0.95


@pytest.mark.parametrize("n, m", [(2, 4), (1, 8)])
def test_loss_estimate_is_the_measured_error(n, m):
    """With (almost) no damping the OBS losses add up to ||X (W - W')^T||^2 / T exactly."""
    x = calibration_inputs(200, 32, seed=3)
    w = weight(10, 32, seed=4)
    pruned, _, loss = sparsegpt_prune(w, ref_hessian(x), n, m, blocksize=8, damp=1e-10)
    measured = error(x, w, pruned) ** 2 / x.shape[0]
    assert float(loss) == pytest.approx(measured, rel=1e-6)


def test_dead_inputs_are_zeroed_and_match_reference():
    x = calibration_inputs(64, 16, seed=5)
    x[:, [3, 9]] = 0.0  # inputs that never fire
    w = weight(6, 16, seed=6)
    got, keep, _ = sparsegpt_prune(w, ref_hessian(x), 2, 4, blocksize=8)
    assert (got[:, [3, 9]] == 0).all()
    torch.testing.assert_close(got, ref_sparsegpt(w, ref_hessian(x), 2, 4), rtol=1e-9, atol=1e-9)
    assert (keep.reshape(6, -1, 4).sum(-1) == 2).all()  # the mask is still exactly 2:4 (a kept weight may be 0)


def test_inverse_factor_is_cholesky_of_the_damped_inverse():
    x = calibration_inputs(80, 16, seed=7)
    h = ref_hessian(x)
    u, dead = inverse_hessian_factor(h, damp=0.05)
    damped = h + 0.05 * h.diagonal().mean() * torch.eye(16, dtype=h.dtype)
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)
    assert torch.equal(u, u.triu()) and not dead.any()


@pytest.mark.parametrize("n, m", PATTERNS)
def test_magnitude_matches_reference(n, m):
    w = weight(6, 32, seed=n + m)
    pruned, keep = magnitude_prune(w, n, m)
    assert torch.equal(pruned, ref_magnitude(w, n, m)) and torch.equal(keep, pruned != 0)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), 2, 4)
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(4), 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), 2, 4, blocksize=6)
