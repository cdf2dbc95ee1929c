import copy

import pytest
import torch
from torch import nn

import maxq
from maxq.core.nm import to_blocks
from maxq.core.reference import ref_nm_mask, ref_sparsifier_masks

from ..nets import batch, mlp, small_cnn, train_steps


def _masks(sparsifier):
    return {k: v.clone() for k, v in sparsifier.named_masks()}


def test_classes_are_unchanged_and_weights_are_masked():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 0)))
    assert isinstance(model[3], nn.Conv2d)  # parametrize's subclass while masked
    w = model[3].weight  # the effective weight
    assert bool(((to_blocks(w, 4) != 0).sum(-1) <= 2).all())
    assert sp.layers == ["3", "6", "10"]
    maxq.fold_(model)
    assert type(model[3]) is nn.Conv2d  # folding gives the stock class back


def test_straight_through_gradient_equals_unmasked_gradient():
    torch.manual_seed(1)
    model = mlp()
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 0)))
    x, y = batch(model)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    # Plain reference: the same network with W_eff = W * Mask as an ordinary leaf tensor.
    layer = model[2]
    mask = dict(sp.named_masks())["2"]
    w_eff = (layer.parametrizations.weight.original * mask).detach().requires_grad_()
    h = torch.relu(model[0](x))
    out = model[4](torch.relu(nn.functional.linear(h, w_eff, layer.bias)))
    nn.functional.cross_entropy(out, y).backward()
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, w_eff.grad)
    assert bool((layer.parametrizations.weight.original.grad[mask == 0] != 0).any())


def test_oneshot_masks_gradient_and_keeps_pruned_weights_zero():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.OneShotConfig())
    before = _masks(sp)
    original = model[3].parametrizations.weight.original
    assert bool((original[before["3"] == 0] == 0).all())  # zeros handed to the optimizer
    train_steps(model, sp, steps=3)
    after = _masks(sp)
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen
    assert bool((original[before["3"] == 0] == 0).all())  # still zero after training


@pytest.mark.parametrize("config", [maxq.SRSTEConfig(), maxq.MaxQConfig(ramp=(0, 0))])
def test_srste_decay_touches_pruned_weights_only(config):
    model = small_cnn()
    sp = maxq.sparsify_(model, config)
    x, y = batch(model)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    original = model[3].parametrizations.weight.original
    mask = dict(sp.named_masks())["3"]
    grad_before = original.grad.clone()
    sp.regularize_()
    delta = original.grad - grad_before
    pruned = mask == 0
    assert torch.equal(delta[~pruned], torch.zeros_like(delta[~pruned]))
    torch.testing.assert_close(delta[pruned], 2e-4 * original.detach()[pruned])


def test_regularize_without_grad_is_a_no_op():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.SRSTEConfig())
    sp.regularize_()  # no backward yet: nothing to do, no error
    assert model[3].parametrizations.weight.original.grad is None


@pytest.mark.parametrize("builder", [small_cnn, mlp])
@pytest.mark.parametrize("config", [maxq.MaxQConfig(ramp=(0, 1)), maxq.SRSTEConfig(), maxq.OneShotConfig()])
def test_masked_eval_output_equals_folded_output(builder, config):
    model = builder()
    sp = maxq.sparsify_(model, config)
    sp.set_progress(1)
    train_steps(model, sp, steps=2)
    model.eval()
    x, _ = batch(model)
    with torch.no_grad():
        masked = model(x)
    params = {id(p) for p in model.parameters()}
    maxq.fold_(model)
    assert {id(p) for p in model.parameters()} == params  # identity kept: the optimizer stays valid
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked)
    assert maxq.check_nm(model, config.n, config.m).ok


def test_fold_refuses_unfinished_ramp_unless_forced():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 10)))
    sp.set_progress(3)
    train_steps(model, sp, steps=1)
    with pytest.raises(RuntimeError, match="ramp is unfinished"):
        maxq.fold_(model)
    assert hasattr(model[3], "parametrizations")  # nothing was changed
    maxq.fold_(model, force=True)
    assert maxq.check_nm(model, 2, 4).ok
    with pytest.raises(RuntimeError, match="folded"):
        sp.set_progress(4)


def test_fold_without_masks():
    with pytest.raises(ValueError, match="no maxq masks"):
        maxq.fold_(small_cnn())


def test_progress_sets_dense_fraction_and_report():
    model = small_cnn(channels=32)
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 4)))
    assert sp.set_progress(0) == 1.0
    assert sp.set_progress(2) == pytest.approx(0.5)
    train_steps(model, sp, steps=1)
    report = sp.report()
    rows = {r.name: r for r in report.layers}
    assert rows["3"].dense_block_fraction == pytest.approx(0.5, abs=0.01)
    assert 1.0 <= rows["3"].mean_soft_scale <= 3.0
    assert rows["0"].skipped.startswith("first conv")
    assert "dense blocks" in str(report)
    assert sp.set_progress(4) == 0.0 and sp.ramp_finished


def test_forward_never_changes_masks_step_does():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.SRSTEConfig())
    x, _ = batch(model)
    first = _masks(sp)
    with torch.no_grad():
        model[3].parametrizations.weight.original.mul_(-1).add_(torch.randn(32, 16, 3, 3))
    for mode in (model.eval, model.train):  # neither an eval nor a training forward touches the masks
        mode()
        model(x)
        assert all(torch.equal(first[k], v) for k, v in _masks(sp).items())
    assert sp.step() is True
    assert not torch.equal(first["3"], _masks(sp)["3"])
    assert torch.equal(_masks(sp)["3"], ref_nm_mask(model[3].parametrizations.weight.original, 2, 4).float())


def test_update_every_recomputes_every_k_steps():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.SRSTEConfig(update_every=3))
    x, y = batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen, updated = [], []
    for _ in range(6):
        seen.append(_masks(sp)["3"])  # the mask this step's forward uses
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        updated.append(sp.step())
    # Forwards 0, 1, 2 use the initial mask; step() after the third optimizer step recomputes for forward 3.
    assert updated == [False, False, True, False, False, True]
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert torch.equal(seen[3], seen[4]) and torch.equal(seen[4], seen[5])
    assert not torch.equal(seen[2], seen[3])
    assert sp.steps == 6


@pytest.mark.parametrize(
    "config", [maxq.MaxQConfig(ramp=(0, 3), update_every=2), maxq.SRSTEConfig(), maxq.OneShotConfig()]
)
def test_state_dict_round_trip_resumes_exactly(config):
    torch.manual_seed(3)
    base = small_cnn()
    data = batch(base)

    def run(model, sp, opt, epochs):
        for epoch in epochs:
            sp.set_progress(epoch)
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(model(data[0]), data[1]).backward()
                sp.regularize_()
                opt.step()
                sp.step()

    a = copy.deepcopy(base)
    sp_a = maxq.sparsify_(a, config)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    run(a, sp_a, opt_a, range(2))
    state = {
        "model": copy.deepcopy(a.state_dict()),
        "opt": copy.deepcopy(opt_a.state_dict()),
        "sp": copy.deepcopy(sp_a.state_dict()),
    }
    run(a, sp_a, opt_a, range(2, 4))

    b = copy.deepcopy(base)
    sp_b = maxq.sparsify_(b, config)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    sp_b.load_state_dict(state["sp"])
    run(b, sp_b, opt_b, range(2, 4))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert all(torch.equal(_masks(sp_a)[k], _masks(sp_b)[k]) for k in sp_a.layers)


def test_load_state_dict_rejects_mismatches():
    sp = maxq.sparsify_(small_cnn(), maxq.MaxQConfig())
    state = sp.state_dict()
    with pytest.raises(ValueError, match="format"):
        sp.load_state_dict({"layers": {}})
    other = maxq.sparsify_(small_cnn(), maxq.MaxQConfig(n=1, m=4))
    with pytest.raises(ValueError, match="n=2"):
        other.load_state_dict(state)
    wider = maxq.sparsify_(small_cnn(channels=32), maxq.MaxQConfig())
    with pytest.raises(ValueError, match="shape"):
        wider.load_state_dict(state)


def test_sparsify_twice_is_an_error():
    model = small_cnn()
    maxq.sparsify_(model, maxq.MaxQConfig())
    with pytest.raises(ValueError, match="already sparsified"):
        maxq.sparsify_(model, maxq.MaxQConfig())


def test_random_order_is_seeded():
    def dense_after(seed):
        torch.manual_seed(0)
        model = small_cnn(channels=32)
        sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 2), order="random", seed=seed))
        sp.set_progress(1)
        model.train()
        model(batch(model)[0])
        return _masks(sp)["3"]

    assert torch.equal(dense_after(1), dense_after(1))
    assert not torch.equal(dense_after(1), dense_after(2))


@pytest.mark.parametrize("fused", [True, False])
def test_per_step_progress_in_step_equals_set_progress_then_step(fused):
    torch.manual_seed(2)
    base = small_cnn(channels=32)
    x, y = batch(base)
    cfg = maxq.MaxQConfig(ramp=(0, 1), per_step=True)
    runs = []
    for via_step in (True, False):
        model = copy.deepcopy(base)
        sp = maxq.sparsify_(model, cfg)
        sp.fused = fused
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp.set_progress(0.0)
        for i in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if via_step:
                sp.step(progress=(i + 1) / 8)
            else:
                sp.step()
                sp.set_progress((i + 1) / 8)
            ref = ref_sparsifier_masks(sp)  # every update: the masks of the current weights and p
            for name, mask in sp.named_masks():
                torch.testing.assert_close(mask, ref[name])
        runs.append(_masks(sp))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_hook_optimizer_equals_explicit_calls():
    torch.manual_seed(4)
    base = small_cnn()
    x, y = batch(base)
    results = []
    for auto in (True, False):
        model = copy.deepcopy(base)
        sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 0)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        handles = sp.hook_optimizer(opt) if auto else []
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if not auto:
                sp.regularize_()
            opt.step()
            if not auto:
                sp.step()
        for h in handles:
            h.remove()
        assert sp.steps == 3
        results.append((copy.deepcopy(model.state_dict()), _masks(sp)))
    (wa, ma), (wb, mb) = results
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_loading_weights_recomputes_masks():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 0)))
    other = small_cnn()
    maxq.sparsify_(other, maxq.MaxQConfig(ramp=(0, 0)))
    with torch.no_grad():
        other[3].parametrizations.weight.original.normal_()
    model.load_state_dict(other.state_dict())
    ref = ref_sparsifier_masks(sp)
    for name, mask in sp.named_masks():
        torch.testing.assert_close(mask, ref[name])


def test_oneshot_step_and_progress_keep_the_mask():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.OneShotConfig())
    before = _masks(sp)
    with torch.no_grad():
        model[3].parametrizations.weight.original.normal_()
    assert sp.step() is False and sp.set_progress(5) == 0.0
    assert all(torch.equal(before[k], v) for k, v in _masks(sp).items())


def _deep_mlp(norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(16, 32, bias=False)]  # no biases: the weights carry the signal
    for _ in range(4):
        layers += [nn.LayerNorm(32)] if norm else []
        layers += [nn.ReLU(), nn.Linear(32, 32, bias=False)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize(
    "norm, config, warns",
    [
        (False, maxq.MaxQConfig(ramp=(0, 0)), True),  # soft scale compounds over the unnormalized layers
        (False, maxq.MaxQConfig(ramp=(0, 0), queries=False), False),  # hard mask: no scale
        (False, maxq.SRSTEConfig(), False),
        (True, maxq.MaxQConfig(ramp=(0, 0)), False),  # LayerNorm absorbs it
    ],
)
def test_warns_when_soft_scale_meets_unnormalized_model(caplog, norm, config, warns):
    torch.manual_seed(0)
    model = _deep_mlp(norm)
    with caplog.at_level("WARNING", logger="maxq"):
        sp = maxq.sparsify_(model, config)
    assert len(sp.layers) == 5  # every Linear but the classifier
    messages = [r.getMessage() for r in caplog.records if "normalization layer" in r.getMessage()]
    assert bool(messages) == warns
    if warns:  # the scale it quotes is the masks' own mean over kept weights, in [1, 3]
        scale = float(messages[0].split("about ")[1].split("x")[0])
        kept = torch.cat([mask[mask != 0] for _, mask in sp.named_masks()])
        assert 1.0 < scale <= 3.0 and scale == pytest.approx(float(kept.mean()), abs=0.051)


def test_the_soft_scale_does_compound_without_normalization():
    # Why the warning exists: on the same weights, MaxQ's soft mask gives far larger outputs than the hard mask.
    torch.manual_seed(0)
    soft, x = _deep_mlp(False), torch.randn(64, 16)
    hard = copy.deepcopy(soft)
    maxq.sparsify_(soft, maxq.MaxQConfig(ramp=(0, 0)))
    maxq.sparsify_(hard, maxq.MaxQConfig(ramp=(0, 0), queries=False))
    features = [float(net[:-1](x).detach().abs().mean()) for net in (soft, hard)]  # before the dense classifier
    assert features[0] > 8 * features[1]  # ~1.8x per layer over five layers


@pytest.mark.parametrize("config", [maxq.MaxQConfig(ramp=(0, 0)), maxq.SRSTEConfig()], ids=["maxq", "srste"])
def test_a_dense_state_dict_loads_into_a_sparsified_model(config):
    # Issue 27: library.md says loading weights recomputes the masks; a dense state dict gave torch's missing keys.
    torch.manual_seed(5)
    dense = small_cnn().state_dict()
    keys = list(dense)
    model = small_cnn()
    sp = maxq.sparsify_(model, config)
    model.load_state_dict(dense)  # strict: every key matched
    for name in sp.layers:
        assert torch.equal(model.get_submodule(name).parametrizations.weight.original, dense[f"{name}.weight"])
    ref = ref_sparsifier_masks(sp)
    for name, mask in sp.named_masks():  # the masks of the loaded weights
        torch.testing.assert_close(mask, ref[name])
    assert list(dense) == keys  # the caller's dict is left as it was
    # Under a parent module (a prefix), and mixed with sparsified keys: only the plain ones are renamed.
    wrapper = nn.Sequential(model)
    mixed = {f"0.{k}": v for k, v in model.state_dict().items()}
    mixed["0.6.weight"] = mixed.pop("0.6.parametrizations.weight.original") * 2
    wrapper.load_state_dict(mixed)
    torch.testing.assert_close(model[6].parametrizations.weight.original, mixed["0.6.weight"])
    # Once folded, the model is plain again: a plain state dict loads as for any model.
    maxq.fold_(model)
    model.load_state_dict(dense)
    assert torch.equal(model[3].weight, dense["3.weight"])


def test_a_dense_state_dict_into_a_one_shot_model_says_to_load_first():
    model = small_cnn()
    maxq.sparsify_(model, maxq.OneShotConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"OneShotConfig.*Load the weights first, then call maxq\.sparsify_"):
        model.load_state_dict(small_cnn().state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), True, "1", None])
def test_progress_must_be_a_finite_number_of_epochs(bad):
    # Issue 27: set_progress(-1) was accepted.
    sp = maxq.sparsify_(small_cnn(), maxq.MaxQConfig(ramp=(0, 2)))
    with pytest.raises(ValueError, match=r"progress must be a finite number of epochs >= 0"):
        sp.set_progress(bad)
    if bad is not None:  # step(None) is a step without progress
        with pytest.raises(ValueError, match=r"progress must be a finite number of epochs >= 0"):
            sp.step(bad)
    assert sp.progress is None and sp.steps == 0  # nothing moved
    assert sp.set_progress(torch.tensor(1.0)) == 0.5 and sp.progress == 1.0  # a 0-d tensor is a number


def test_resuming_with_other_settings_says_what_to_do(caplog):
    model = small_cnn()
    state = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 2), tau=0.05)).state_dict()
    other = maxq.sparsify_(small_cnn(), maxq.MaxQConfig(ramp=(0, 2)))
    with caplog.at_level("WARNING", logger="maxq"):
        other.load_state_dict(state)
    text = caplog.text
    assert "saved {'tau': 0.05}, this sparsifier {'tau': 0.01}" in text and "continues with this sparsifier's" in text
    assert "maxq.make_config('maxq', **saved)" in text
