"""Masks follow the weights through training.

After every update (``sparsifier.step()`` every ``update_every`` optimizer steps, and ``set_progress`` when the
dense fraction changes) each layer's mask must be the plain full-sort reference mask of that layer's weights at
the update. A sparsifier whose masks stop changing after some step (fixed-mask training in disguise) fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maxq
from maxq.core.reference import ref_maxq_mask, ref_nm_mask

from ..nets import batch, small_cnn


def _weights(model: nn.Module, sparsifier) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].parametrizations.weight.original.detach().clone() for name in sparsifier.layers}


def _reference(config, weight: torch.Tensor, p: float) -> torch.Tensor:
    return ref_maxq_mask(
        weight,
        config.n,
        config.m,
        dense_fraction=p,
        order=getattr(config, "order", "smallest"),
        tau=getattr(config, "tau", 0.01),
        soft=config.soft,
    )


def _assert_masks_are_reference(sparsifier, anchor: dict[str, torch.Tensor], p: float, when: str) -> None:
    masks = dict(sparsifier.named_masks())
    assert masks.keys() == anchor.keys()
    for name, weight in anchor.items():
        expected = _reference(sparsifier.config, weight, p)
        torch.testing.assert_close(masks[name], expected, msg=lambda m, name=name: f"{when}, layer {name}: {m}")


@pytest.mark.parametrize(
    "config, epochs, steps",
    [
        pytest.param(maxq.SRSTEConfig(), [0, 1], 4, id="srste"),
        pytest.param(maxq.SRSTEConfig(update_every=3), [0, 1, 2], 4, id="srste-every-3"),
        # Ramp over epochs 0-4: p = 0.75 at epoch 1 and 0.5 at epoch 2 (a quarter of the blocks dense or more).
        pytest.param(maxq.MaxQConfig(ramp=(0, 4)), [1, 2], 4, id="maxq-mid-ramp"),
        pytest.param(maxq.MaxQConfig(ramp=(0, 4), update_every=2), [1, 2], 4, id="maxq-mid-ramp-every-2"),
        pytest.param(maxq.MaxQConfig(ramp=(0, 1)), [1, 2], 4, id="maxq-after-ramp"),
        pytest.param(maxq.MaxQConfig(ramp=(0, 1), queries=False), [1, 2], 4, id="maxq-hard-after-ramp"),
    ],
)
def test_mask_is_the_reference_mask_of_the_weights_after_every_update(config, epochs, steps):
    torch.manual_seed(0)
    model = small_cnn(channels=32)
    sparsifier = maxq.sparsify_(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x, y = batch(model, size=32)
    every = config.update_every
    anchor = _weights(model, sparsifier)  # the weights the current masks were computed from
    p = sparsifier.dense_fraction
    updates = changed = calls = 0
    model.train()
    for epoch in epochs:
        new_p = sparsifier.set_progress(epoch)
        if new_p != p:  # a new dense fraction is applied at once, to the current weights
            p, anchor = new_p, _weights(model, sparsifier)
        _assert_masks_are_reference(sparsifier, anchor, p, f"after set_progress({epoch})")
        for i in range(steps):
            before = {k: v.clone() for k, v in sparsifier.named_masks()}
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sparsifier.regularize_()
            optimizer.step()
            sparsifier.step()
            calls += 1
            if calls % every == 0:  # an update step: masks now follow the weights just updated
                anchor = _weights(model, sparsifier)
                updates += 1
            else:  # between updates the masks stay those of the last update
                assert all(torch.equal(before[k], v) for k, v in sparsifier.named_masks()), (epoch, i)
            _assert_masks_are_reference(sparsifier, anchor, p, f"epoch {epoch} step {i} (call {calls})")
            changed += any(not torch.equal(before[k], v) for k, v in sparsifier.named_masks())
    assert updates >= 3
    # The weights moved enough for the masks to change: a sparsifier that stopped updating could not pass.
    assert changed >= 2


def test_oneshot_mask_stays_frozen_whatever_the_weights_do():
    torch.manual_seed(0)
    model = small_cnn(channels=32)
    modules = dict(model.named_modules())
    initial = {name: modules[name].weight.detach().clone() for name in ("3", "6", "10")}
    sparsifier = maxq.sparsify_(model, maxq.OneShotConfig())
    first = {name: ref_nm_mask(w, 2, 4) for name, w in initial.items()}  # from the starting weights
    assert set(first) == set(sparsifier.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x, y = batch(model, size=32)
    model.train()
    for epoch in range(3):
        assert sparsifier.set_progress(epoch) == 0.0
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sparsifier.step()
            masks = dict(sparsifier.named_masks())
            assert all(torch.equal(masks[k], first[k].to(masks[k].dtype)) for k in first)
    # Even weights rewritten so that another mask would win leave the one-shot mask alone.
    with torch.no_grad():
        for name in sparsifier.layers:
            original = modules[name].parametrizations.weight.original
            original.copy_(torch.randn_like(original))
            assert not torch.equal(ref_nm_mask(original, 2, 4), first[name])
    sparsifier.step()
    sparsifier.set_progress(5)
    masks = dict(sparsifier.named_masks())
    assert all(torch.equal(masks[k], first[k].to(masks[k].dtype)) for k in first)
