import pytest
import torch
import torchvision
from torch import nn

import maxq
from maxq.deploy.bnfold import fold_batchnorm_

from ..nets import small_cnn, train_steps


@pytest.mark.parametrize("builder", [small_cnn, lambda: torchvision.models.resnet18(num_classes=10)])
def test_bn_fold_keeps_outputs_and_pattern(builder):
    model = builder()
    sp = maxq.sparsify_(model, maxq.SRSTEConfig(n=1, m=4))
    train_steps(model, sp, steps=2, data=(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))))
    maxq.fold_(model)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    pairs = fold_batchnorm_(model)
    assert pairs and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert maxq.check_nm(model, 1, 4).ok
    # Zeros are canonical +0.0 (compression restores them bit for bit).
    for name in model.maxq_layout["layers"]:
        w = dict(model.named_modules())[name].weight
        assert not bool((torch.signbit(w) & (w == 0)).any())


def test_needs_folded_masks():
    model = small_cnn()
    maxq.sparsify_(model, maxq.SRSTEConfig())
    with pytest.raises(ValueError, match="fold the N:M masks first"):
        fold_batchnorm_(model)
