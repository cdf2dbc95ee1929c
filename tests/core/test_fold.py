"""Folding over a grid of N:M patterns and layer types: exactly N nonzeros per block, the N largest, same outputs."""

import pytest
import torch
from torch import nn

import maxq
from maxq.core.nm import to_blocks

from ..conftest import PATTERNS

LAYERS = {
    "conv3x3": lambda: nn.Conv2d(32, 16, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(32, 16, 1),
    "linear": lambda: nn.Linear(32, 16),
}


def _wrap(layer: nn.Module) -> nn.Module:
    # The layer under test sits between a dense first layer and a dense classifier (the default rule's skips).
    first = nn.Conv2d(3, 32, 1) if isinstance(layer, nn.Conv2d) else nn.Linear(3, 32)
    return nn.Sequential(first, nn.ReLU(), layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("method", ["srste", "maxq"])
def test_fold_leaves_exactly_n_largest(kind, n, m, method):
    model = _wrap(LAYERS[kind]())
    x = torch.randn(2, 3, 4, 4) if kind != "linear" else torch.randn(2, 3)
    model(x)  # materialize the lazy classifier
    original = model[2].weight.detach().clone()
    config = maxq.SRSTEConfig(n=n, m=m) if method == "srste" else maxq.MaxQConfig(n=n, m=m, ramp=(0, 0))
    maxq.sparsify_(model, config)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    maxq.fold_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked)
    folded = to_blocks(model[2].weight.detach(), m)
    kept = folded != 0
    assert torch.equal(kept.sum(-1), torch.full((folded.shape[0],), n))  # exactly N per block
    magnitude = to_blocks(original.abs(), m)
    smallest_kept = torch.where(kept, magnitude, torch.inf).amin(-1)
    largest_pruned = torch.where(kept, -torch.inf, magnitude).amax(-1)
    assert bool((smallest_kept >= largest_pruned).all())  # the kept ones are the N largest
    assert maxq.check_nm(model, n, m).ok


@pytest.mark.parametrize("soft_warmup", ["ramp", "normalize"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 16)])
def test_soft_warmup_masks_stay_exactly_nm_after_fold(soft_warmup, n, m):
    from ..nets import batch, small_cnn

    model = small_cnn()
    sparsifier = maxq.sparsify_(model, maxq.MaxQConfig(n=n, m=m, ramp=(0, 2), per_step=True, soft_warmup=soft_warmup))
    sparsifier.set_progress(1.0)  # half way: a = 0.5, half the blocks still dense
    model.eval()
    x = batch(model)[0]
    sparsifier.set_progress(2.0)  # ramp over: every block N:M, the soft factor in full
    before = model(x)
    maxq.fold_(model)
    assert maxq.check_nm(model, n, m).ok
    torch.testing.assert_close(model(x), before)
