"""The device-agnostic mask path never makes the host wait for the device: a training step with masks costs no
host-synchronising op beyond those of a dense step (watched on the CPU with the fused kernels off; on CUDA the
same check runs under ``torch.cuda.set_sync_debug_mode`` in tests/gpu)."""

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import maxq
from maxq._engine.syncs import host_syncs
from maxq.core import codes


def _bottleneck_resnet() -> nn.Module:
    """ResNet-50's layer kinds and widths (7x7 stem, 1x1-3x3-1x1 bottlenecks, strided 1x1 downsamples, up to 2048
    channels, the classifier) with one block per stage instead of 3-4-6-3: the same ops, a third of the time."""
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)


def _train_step(model, sparsifier, opt, x, y, progress=None):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    if sparsifier is not None:
        sparsifier.regularize_()
    opt.step()
    if sparsifier is not None:
        sparsifier.step(progress)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, progress",
    [
        (maxq.MaxQConfig(ramp=(0, 4), per_step=True), 1.5),  # mid-ramp: dense blocks picked at every update
        (maxq.MaxQConfig(ramp=(0, 4)), 4.0),  # after the ramp
        (maxq.SRSTEConfig(), None),
        (maxq.MaxQConfig(n=1, m=16, ramp=(0, 4), order="random"), 2.0),
        (maxq.MaxQConfig(ramp=(0, 4), per_step=True, soft_warmup="ramp"), 1.5),  # the soft factor phased in
        (maxq.MaxQConfig(ramp=(0, 4), soft_warmup="normalize"), 4.0),  # kept values averaged to 1
        (maxq.SRSTEConfig(n=1, m=16), None),  # kept-index codes, encoded and decoded on the device-agnostic path
        (maxq.OneShotConfig(n=1, m=8), None),
    ],
    ids=[
        "maxq-mid-ramp",
        "maxq",
        "srste",
        "maxq-1:16-random",
        "maxq-soft-warmup-ramp",
        "maxq-soft-warmup-normalize",
        "srste-1:16-codes",
        "oneshot-1:8-codes",
    ],
)
def test_training_step_on_a_bottleneck_resnet_makes_no_host_sync(monkeypatch, config, progress):
    monkeypatch.setattr(codes, "_fused", lambda t: False)  # the codes' path CUDA tensors take
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    dense = _bottleneck_resnet()
    opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)
    _train_step(dense, None, opt, x, y)  # the optimizer's first step allocates its state
    with host_syncs("cpu") as baseline:
        _train_step(dense, None, opt, x, y)

    model = _bottleneck_resnet()
    sparsifier = maxq.sparsify_(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if progress is not None:
        sparsifier.set_progress(progress)
    _train_step(model, sparsifier, opt, x, y)
    sparsifier.fused = False  # the path CUDA tensors take
    p_before = sparsifier.dense_fraction
    with host_syncs("cpu") as sparse:  # a step whose progress moves the ramp on: the dense blocks are chosen anew
        _train_step(model, sparsifier, opt, x, y, progress=None if progress is None else progress + 0.5)
    assert sparsifier.steps == 2
    assert (sparsifier.dense_fraction != p_before) == (getattr(config, "per_step", False) and progress is not None)
    assert sparse == baseline, f"host syncs beyond a dense step: {sorted(set(sparse) - set(baseline))}"
    coded = any(layer.param.coded for layer in sparsifier._layers.values())
    assert coded == codes.uses_code(config.n, config.m, config.soft, config.exact_n)  # the codes' path ran where due
