"""Hugging Face ``Conv1D`` (GPT-2 family, weight stored ``[in, out]``): N:M along its inputs (dim 0), like a Linear,
through masks, fold, check, compressed files and ONNX; tied weights are never masked; other HF models still work."""

import pytest
import torch
from torch import nn

import maxq
from maxq.core.layers import input_axis, is_hf_conv1d
from maxq.core.layout import NMLayout
from maxq.core.nm import oi_view
from maxq.core.reference import ref_maxq_mask, ref_nm_mask, ref_sparsifier_masks

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONFIGS = {
    "maxq": lambda: maxq.MaxQConfig(ramp=(0, 0)),
    "srste": lambda: maxq.SRSTEConfig(),
    "oneshot": lambda: maxq.OneShotConfig(),
}


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _blocks_along_inputs(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per block of ``m`` consecutive inputs of one output of an ``[in, out]`` weight (plain indexing)."""
    i, o = weight.shape
    return (weight.t().reshape(o, i // m, m) != 0).sum(-1)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_gpt2_trains_folds_and_checks_along_inputs(method):
    model = gpt2()
    sparsifier = maxq.sparsify_(model, CONFIGS[method]())
    conv1d = [name for name, mod in model.named_modules() if isinstance(mod, Conv1D)]
    assert sparsifier.layers == conv1d and len(conv1d) == 8
    assert set(sparsifier.layout.transposed) == set(conv1d)
    # Masks equal the plain reference (transposed layout), before and after training steps.
    for name, mask in sparsifier.named_masks():
        torch.testing.assert_close(mask, ref_sparsifier_masks(sparsifier)[name])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier.hook_optimizer(opt)
    x = _tokens()
    for _ in range(3):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = ref_sparsifier_masks(sparsifier)
    for name, mask in sparsifier.named_masks():
        torch.testing.assert_close(mask, reference[name])
    model.eval()
    with torch.no_grad():
        masked = model(x).logits
    maxq.fold_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, masked, rtol=0, atol=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # tying intact
    report = maxq.check_nm(model, 2, 4)
    assert report.ok and {c.name for c in report.expected} == set(conv1d)
    for name in conv1d:
        weight = model.get_submodule(name).weight
        assert (_blocks_along_inputs(weight, 4) == 2).all(), name  # exactly 2 of every 4 inputs
    # The folded state dict with its layout record checks the same way; without the axis it does not.
    state = {"state_dict": model.state_dict(), "layout": model.maxq_layout.to_dict()}
    assert maxq.check_nm(state, 2, 4).ok
    assert not maxq.check_nm(state, 2, 4, transposed=[]).ok


def test_masks_fused_and_device_agnostic_agree():
    masks = {}
    for fused in (True, False):
        model = gpt2()
        sparsifier = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 4)))
        sparsifier.fused = fused
        sparsifier.set_progress(2)  # half the blocks dense: the dense-block cut runs along inputs too
        masks[fused] = dict(sparsifier.named_masks())
        for name, mask in masks[fused].items():
            torch.testing.assert_close(mask, ref_sparsifier_masks(sparsifier)[name])
    for name in masks[True]:
        torch.testing.assert_close(masks[True][name], masks[False][name])


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (2, 8), (1, 16)])
def test_reference_transposed_layout_is_the_transpose(n, m):
    w = torch.randn(32, 24)  # [in, out]
    assert torch.equal(ref_nm_mask(w, n, m, input_axis=0), ref_nm_mask(w.t(), n, m).t())
    mask = ref_maxq_mask(w, n, m, input_axis=0, dense_fraction=0.25)
    assert torch.equal(mask, ref_maxq_mask(w.t().contiguous(), n, m, dense_fraction=0.25).t())
    assert torch.equal(oi_view(w, 0), w.t())


def test_tied_weights_are_never_masked():
    model = gpt2()
    choices = {c.name: c for c in maxq.select_layers(model, 4, lambda module, name: True)}
    assert not choices["lm_head"].selected
    assert choices["lm_head"].reason == "weight shared with transformer.wte (tied)"
    sparsifier = maxq.sparsify_(model, maxq.SRSTEConfig(skip_last=False))
    assert "lm_head" not in sparsifier.layers
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="tied"):
        maxq.sparsify_(gpt2(), maxq.SRSTEConfig(strict=True), lambda module, name: name == "lm_head")


def test_conv1d_is_recognised_by_duck_typing_only_from_transformers():
    assert is_hf_conv1d(Conv1D(8, 4)) and input_axis(Conv1D(8, 4)) == 0

    class Conv1D_(nn.Linear):  # a look-alike from elsewhere
        pass

    Conv1D_.__name__ = "Conv1D"
    fake = Conv1D_(4, 8)
    fake.nf = 8
    assert not is_hf_conv1d(fake) and input_axis(fake) == 1 and input_axis(nn.Linear(4, 8)) == 1
    # A Conv1D whose input count m does not divide is reported, not sparsified.
    model = nn.Sequential(nn.Linear(4, 6), Conv1D(8, 6), Conv1D(8, 8), nn.Linear(8, 2))
    reasons = {c.name: c.reason for c in maxq.select_layers(model, 4)}
    assert reasons["1"] == "input features 6 not divisible by m=4" and reasons["2"] == ""


def test_layout_record_keeps_old_records_readable():
    old = {"method": "maxq", "n": 2, "m": 4, "layers": ["a", "b"]}
    assert NMLayout.from_dict(old).transposed == () and "transposed" not in NMLayout.from_dict(old).to_dict()
    new = NMLayout(2, 4, ("a", "b"), "maxq", ("b",))
    assert NMLayout.from_dict(new.to_dict()) == new and new.input_axis("b") == 0 and new.input_axis("a") == 1
    assert new.prefixed("p").transposed == ("p.b",)
    with pytest.raises(ValueError, match="not among its layers"):
        NMLayout(2, 4, ("a",), None, ("c",))


def _small_conv1d_net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.LayerNorm(16), Conv1D(32, 16), nn.ReLU(), Conv1D(16, 32), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def test_compressed_round_trip_and_verify(tmp_path):
    from maxq.deploy.compress import load_compressed, read_compressed, save_compressed
    from maxq.deploy.verify import verify_file

    model = gpt2()
    sparsifier = maxq.sparsify_(model, maxq.SRSTEConfig())
    sparsifier.fold_()
    layout = model.maxq_layout
    state = {k: v for k, v in model.state_dict().items()}
    path = tmp_path / "gpt2.maxq"
    save_compressed(state, path, 2, 4, layout.layers, transposed=layout.transposed)
    restored = load_compressed(path)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    meta = read_compressed(path)[1]
    assert meta["version"] == 3 and all(meta["layers"][name]["input_axis"] == 0 for name in layout.transposed)
    report, kind, _ = verify_file(path)
    assert report.ok and kind == "compressed" and len(report.expected) == 8


def test_onnx_export_of_conv1d_layers(tmp_path):
    pytest.importorskip("onnxruntime")
    from maxq.deploy.onnx_export import export_onnx, onnx_parity
    from maxq.deploy.verify import verify_file

    model = _small_conv1d_net()
    sparsifier = maxq.sparsify_(model, maxq.SRSTEConfig())
    assert sparsifier.layers == ["0", "2", "4"] and sparsifier.layout.transposed == ("2", "4")
    sparsifier.fold_()
    x = torch.randn(3, 8)
    sparse = export_onnx(model, tmp_path / "m.onnx", x, n=2, m=4)
    assert len(sparse) == 3  # the Conv1D initializers ([in, out]) are found as N:M along their inputs
    report, kind, _ = verify_file(tmp_path / "m.onnx")
    assert kind == "onnx" and report.ok and len(report.expected) == 3
    assert max(onnx_parity(model, tmp_path / "m.onnx", x).values()) < 1e-5


@pytest.mark.parametrize("arch", ["vit", "llama", "t5", "bert"])
def test_linear_hf_models_still_sparsify(arch):
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    if arch == "vit":
        cfg = transformers.ViTConfig(num_hidden_layers=1, image_size=16, patch_size=8, **small)
        model, x = transformers.ViTModel(cfg), {"pixel_values": torch.randn(1, 3, 16, 16)}
    elif arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=1, vocab_size=64, num_key_value_heads=4, **small)
        model, x = transformers.LlamaForCausalLM(cfg), {"input_ids": _tokens()}
    elif arch == "t5":
        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        model, x = transformers.T5Model(cfg), {"input_ids": _tokens(), "decoder_input_ids": _tokens()}
    else:
        cfg = transformers.BertConfig(num_hidden_layers=1, vocab_size=64, **small)
        model, x = transformers.BertModel(cfg), {"input_ids": _tokens()}
    sparsifier = maxq.sparsify_(model, maxq.SRSTEConfig())
    assert len(sparsifier.layers) >= 4 and sparsifier.layout.transposed == ()
    model.eval()
    with torch.no_grad():
        before = model(**x)[0]
    maxq.fold_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**x)[0], before)
    assert maxq.check_nm(model, 2, 4).ok
