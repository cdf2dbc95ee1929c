"""Stock torchvision models, unmodified: sparsify, one training step, fold, N:M compliance."""

import pytest
import torch
import torchvision
from torch import nn

import maxq

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["maxq", "srste"])
def test_stock_model_trains_folds_and_is_nm(name, method):
    build, shape = MODELS[name]
    model = build()
    config = maxq.MaxQConfig(ramp=(0, 1)) if method == "maxq" else maxq.SRSTEConfig()
    sparsifier = maxq.sparsify_(model, config)
    sparsifier.set_progress(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    sparsifier.regularize_()
    opt.step()
    assert torch.isfinite(loss)
    # Compare in training mode: BN uses batch statistics, which after a single step are the only meaningful
    # ones (eval-mode equality is tested on small nets in test_sparsifier.py). The forward recomputes the masks
    # from the stepped weights; folding must reproduce exactly that network.
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout draws in both forwards
        masked = model(x)
        maxq.fold_(model)
        torch.manual_seed(1)
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-4)
    report = maxq.check_nm(model, 2, 4)
    assert report.ok, str(report)
    assert len(report.expected) == len(sparsifier.choices) - len([c for c in sparsifier.choices if not c.selected])


def test_mobilenet_depthwise_layers_are_skipped_with_reason():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    sparsifier = maxq.sparsify_(model, maxq.MaxQConfig())
    report = sparsifier.report()
    depthwise = [r for r in report.skipped if "depthwise" in r.skipped]
    assert len(depthwise) == 17
    assert report.skipped[0].name == "features.0.0" and "first conv" in report.skipped[0].skipped
    assert any("last classifier" in r.skipped for r in report.skipped)


def test_vit_linear_layers_are_sparsified():
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    sparsifier = maxq.sparsify_(model, maxq.SRSTEConfig())
    names = set(sparsifier.layers)
    assert "encoder.layers.encoder_layer_0.mlp.0" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in names
    assert "heads.head" not in names and "conv_proj" not in names
