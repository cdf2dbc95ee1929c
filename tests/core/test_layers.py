import pytest
import torch
from torch import nn

import maxq
from maxq.core.layers import select_layers

from ..nets import small_cnn


def test_default_selection_skips_first_conv_and_last_classifier():
    choices = {c.name: c for c in select_layers(small_cnn(), 4)}
    assert not choices["0"].selected and "first conv" in choices["0"].reason
    assert not choices["12"].selected and "last classifier" in choices["12"].reason
    assert all(choices[k].selected for k in ("3", "6", "10"))


def test_ineligible_layers_are_reported_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise
        nn.Conv2d(8, 12, 3, groups=2),  # grouped
        nn.Conv2d(12, 8, 1),  # 12 not divisible by 8
        nn.Conv1d(8, 8, 1),
        nn.Linear(8, 10),
    )
    choices = {c.name: c for c in select_layers(model, 8)}
    assert "depthwise" in choices["1"].reason
    assert "grouped" in choices["2"].reason
    assert "not divisible" in choices["3"].reason
    assert "unsupported" in choices["4"].reason
    assert not any(c.selected for c in choices.values())


def test_filter_fn_replaces_default_selection():
    model = small_cnn()
    chosen = maxq.select_layers(model, 4, lambda mod, name: isinstance(mod, nn.Linear))
    assert [c.name for c in chosen if c.selected] == ["10", "12"]
    assert "not selected by filter_fn" in next(c for c in chosen if c.name == "3").reason


def test_strict_mode_turns_skips_into_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 8, 3), nn.Linear(8, 2))
    maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4))  # non-strict: skips conv 2 (6 inputs) with a reason
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 8, 3), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"strict mode.*6 not divisible"):
        maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4, strict=True))


def test_nothing_eligible_is_an_error():
    with pytest.raises(ValueError, match="no layer can be sparsified"):
        maxq.sparsify_(small_cnn(channels=6), maxq.SRSTEConfig(n=1, m=16))


def test_non_float_weights_are_a_type_error():
    model = small_cnn()
    model[3].weight = nn.Parameter(torch.zeros(32, 16, 3, 3, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point"):
        maxq.sparsify_(model, maxq.MaxQConfig())


def test_bad_config_type():
    with pytest.raises(TypeError, match="config"):
        maxq.sparsify_(small_cnn(), {"n": 2, "m": 4})


@pytest.mark.parametrize(
    "filter_fn",
    [lambda name: True, lambda module, name, extra: True, lambda: True],
    ids=["one argument", "three arguments", "none"],
)
def test_a_filter_fn_of_the_wrong_signature_says_what_it_must_take(filter_fn):
    # Issue 27: a bare TypeError from inside select_layers.
    with pytest.raises(TypeError, match=r"filter_fn must take two arguments, \(module, qualified_name\).*<lambda>\("):
        maxq.sparsify_(small_cnn(), maxq.SRSTEConfig(), filter_fn=filter_fn)
    with pytest.raises(TypeError, match="must be a callable"):
        select_layers(small_cnn(), 4, filter_fn="conv")
    # Keyword-friendly and variadic callables are fine.
    assert any(c.selected for c in select_layers(small_cnn(), 4, lambda *args: True))
    assert any(c.selected for c in select_layers(small_cnn(), 4, lambda module, name, extra=1: True))


def test_multihead_attention_projection_is_listed_dense_with_the_reason():
    """Issue 27 (7): nn.MultiheadAttention's packed Q/K/V weight was silently missing from the report."""
    import maxq
    from maxq.core.layers import ATTENTION_REASON

    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True), nn.Linear(32, 10))
    sp = maxq.sparsify_(model, maxq.SRSTEConfig())
    rows = {r.name: r for r in sp.report().layers}
    packed = rows["0.self_attn.in_proj_weight"]
    assert packed.nm == "dense" and packed.skipped == ATTENTION_REASON and packed.shape == (96, 32)
    assert {"0.self_attn.out_proj", "0.linear1", "0.linear2"} <= set(sp.layers)
    assert "0.self_attn.in_proj_weight" in str(sp.report())
    with pytest.raises(ValueError, match="in_proj_weight: packed Q/K/V"):
        maxq.sparsify_(
            nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 10)),
            maxq.SRSTEConfig(strict=True),
        )
    # Leaving the attention module out of the selection is what strict mode then asks for.
    other = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 10))
    maxq.sparsify_(other, maxq.SRSTEConfig(strict=True), filter_fn=lambda m, n: isinstance(m, nn.Linear))


def test_separate_attention_projections_are_listed_too():
    model = nn.Sequential(nn.MultiheadAttention(32, 4, kdim=16, vdim=16), nn.Linear(32, 32), nn.Linear(32, 4))
    names = [c.name for c in select_layers(model, 4)]
    assert names[:3] == ["0.q_proj_weight", "0.k_proj_weight", "0.v_proj_weight"]
