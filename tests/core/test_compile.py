"""``torch.compile`` sees through a sparsified model: no graph breaks in its training forward, no recompiles when
the masks change, and the same training as eager (float64)."""

import copy

import pytest
import torch
import torch._dynamo
import torchvision
from torch import nn
from torch._dynamo.testing import CompileCounter

import maxq

from ..nets import batch, small_cnn

CONFIGS = {
    "maxq-mid-ramp": (maxq.MaxQConfig(ramp=(0, 2), per_step=True), 0.5),
    "maxq": (maxq.MaxQConfig(ramp=(0, 2)), 2.0),
    "maxq-soft-warmup-ramp": (maxq.MaxQConfig(ramp=(0, 2), per_step=True, soft_warmup="ramp"), 0.5),
    "maxq-soft-warmup-normalize": (maxq.MaxQConfig(ramp=(0, 2), soft_warmup="normalize"), 2.0),
    "srste": (maxq.SRSTEConfig(), None),
    "oneshot": (maxq.OneShotConfig(), None),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(model, sparsifier, steps, data, progress):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    x, y = data
    for i in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        sparsifier.regularize_()
        opt.step()
        sparsifier.step(None if progress is None else progress + (i + 1) / 8)
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_forward_has_no_graph_breaks(name):
    config, progress = CONFIGS[name]
    model = small_cnn()
    sparsifier = maxq.sparsify_(model, config)
    if progress is not None:
        sparsifier.set_progress(progress)
    model.train()
    explained = torch._dynamo.explain(model)(batch(model)[0])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_resnet18_compiles_once_while_masks_change():
    model = torchvision.models.resnet18(num_classes=10)
    sparsifier = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 1), per_step=True))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    before = {k: v.clone() for k, v in sparsifier.named_masks()}
    losses = _train(compiled, sparsifier, 4, (x, y), 0.0)
    assert torch.isfinite(losses).all()
    assert counter.frame_count == 1  # one graph, compiled once: mask updates and the ramp cause no recompile
    assert any(not torch.equal(before[k], v) for k, v in sparsifier.named_masks())  # the masks did change


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_training_equals_eager_in_float64(name):
    config, progress = CONFIGS[name]
    torch.manual_seed(0)
    base = small_cnn().double()
    data = tuple(t.double() if t.is_floating_point() else t for t in batch(base))
    runs = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(base)
        sparsifier = maxq.sparsify_(model, config)
        if progress is not None:
            sparsifier.set_progress(progress)
        net = torch.compile(model, backend="aot_eager", fullgraph=True) if mode == "compiled" else model
        losses = _train(net, sparsifier, 4, data, progress)
        runs[mode] = (losses, {k: v.clone() for k, v in sparsifier.named_masks()}, copy.deepcopy(model.state_dict()))
    (le, me, we), (lc, mc, wc) = runs["eager"], runs["compiled"]
    torch.testing.assert_close(lc, le, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(mc[k], me[k]) for k in me)
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_inductor_training_matches_eager():
    torch.manual_seed(0)
    base = small_cnn()
    data = batch(base)
    config = maxq.MaxQConfig(ramp=(0, 2), per_step=True)
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        sparsifier = maxq.sparsify_(model, config)
        sparsifier.set_progress(0.5)
        net = torch.compile(model, fullgraph=True) if compiled else model
        results.append(_train(net, sparsifier, 3, data, 0.5))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)
