"""Wanda against the plain per-row, per-block reference, on square and non-square layers."""

import pytest
import torch

from maxq.calibrate import InputStats, wanda_prune, wanda_scores
from tests.calibrate.reference import ref_wanda
from tests.calibrate.test_sparsegpt import SHAPES, calibration_inputs, weight
from tests.conftest import PATTERNS


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", PATTERNS)
def test_matches_reference(seed, shape, n, m):
    rows, cols = shape
    if cols % m:
        pytest.skip("pattern does not divide the inputs")
    x = calibration_inputs(40, cols, seed)
    w = weight(rows, cols, seed)
    stats = InputStats(cols, dtype=torch.float64)
    for part in x.split(13):  # several batches of unequal size
        stats.add(part)
    pruned, keep = wanda_prune(w, stats.mean_square(), n, m)
    want = ref_wanda(w, x, n, m)
    assert torch.equal(pruned, want)
    assert torch.equal(keep, want != 0)
    assert (keep.reshape(rows, -1, m).sum(-1) == n).all()


def test_score_weighs_columns_not_rows():
    """A large activation on input 0 saves a small weight there, in every row."""
    w = torch.tensor([[0.1, 1.0, 1.0, 0.9], [0.2, 0.3, 1.0, 1.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert torch.equal(wanda_scores(w, norms), w.abs() * norms.sqrt())
    _, keep = wanda_prune(w, norms, 2, 4)
    assert keep[:, 0].all()


def test_rejects_statistics_of_the_wrong_size():
    with pytest.raises(ValueError, match="per input column"):
        wanda_prune(torch.randn(4, 8), torch.ones(4), 2, 4)
