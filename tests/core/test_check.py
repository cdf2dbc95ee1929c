import pytest
import torch

import maxq

from ..nets import small_cnn, train_steps


def _folded(config=None):
    model = small_cnn()
    sp = maxq.sparsify_(model, config or maxq.MaxQConfig(ramp=(0, 0)))
    train_steps(model, sp, steps=1)
    return maxq.fold_(model)


def test_folded_model_is_compliant_and_reports_every_layer():
    report = maxq.check_nm(_folded(), 2, 4)
    assert report.ok
    names = [c.name for c in report.expected]
    assert names == ["3", "6", "10"]
    assert all(c.violations == 0 and c.max_nonzero == 2 for c in report.expected)
    assert "OK" in str(report)


def test_violation_is_found():
    model = _folded()
    with torch.no_grad():
        model[6].weight[0, :4, 0, 0] = 1.0
    report = maxq.check_nm(model, 2, 4)
    assert not report.ok
    bad = next(c for c in report.layers if c.name == "6")
    assert bad.violations == 1 and bad.max_nonzero == 4
    assert "NOT N:M" in str(report)


def test_sparsified_model_checks_the_effective_weights():
    model = small_cnn()
    sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 4)))
    sp.set_progress(2)
    train_steps(model, sp, steps=1)
    assert not maxq.check_nm(model, 2, 4).ok  # half the blocks are still dense
    sp.set_progress(4)
    train_steps(model, sp, steps=1)
    assert maxq.check_nm(model, 2, 4).ok


def test_state_dicts():
    model = _folded()
    sd = model.state_dict()
    assert maxq.check_nm(sd, 2, 4).ok  # default rule on key order
    assert (
        maxq.check_nm({"state_dict": sd, "layout": model.maxq_layout.to_dict()}, 2, 4).source
        == "the model's maxq layout"
    )
    sparsified = small_cnn()
    maxq.sparsify_(sparsified, maxq.MaxQConfig())
    with pytest.raises(ValueError, match="unfolded"):
        maxq.check_nm(sparsified.state_dict(), 2, 4)


def test_dense_model_is_not_nm_and_missing_layers_are_reported():
    assert not maxq.check_nm(small_cnn(), 2, 4).ok
    report = maxq.check_nm(_folded(), 2, 4, layers=["3", "nope"])
    assert not report.ok
    assert any(c.note.startswith("missing") for c in report.layers)


def test_wrong_pattern_for_layout():
    with pytest.raises(ValueError, match="sparsified 2:4"):
        maxq.check_nm(_folded(), 1, 4)
