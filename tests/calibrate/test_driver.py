"""``maxq.calibrate_`` on whole models: layer by layer on the inputs of the already pruned layers (against a plain
sequential reference), Hugging Face GPT-2 (Conv1D) and Conv2d layers, shared-input groups, untouched layers, the
hand-over to ``sparsify_(OneShotConfig)``, and its errors."""

import pytest
import torch
from torch import nn

import maxq
from maxq.calibrate import CalibrationConfig, input_columns, weight_columns
from maxq.calibrate.driver import _trace, default_forward
from tests.calibrate.reference import ref_hessian, ref_sparsegpt, ref_wanda
from tests.nets import mlp, small_cnn


def batches(sizes=(5, 7, 6), features=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(features, generator=g))
    return [(torch.randn(s, features, generator=g) * scales).to(dtype) for s in sizes]


def capture_inputs(model: nn.Module, layer: nn.Module, data) -> torch.Tensor:
    """Every row the layer sees over ``data``, as ``[T, D]``."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(input_columns(mod, args[0])))
    with torch.no_grad():
        for x in data:
            model(x)
    handle.remove()
    return torch.cat(seen)


def sequential_reference(model: nn.Module, names: list[str], data, method: str, n: int, m: int) -> nn.Module:
    """Prune ``names`` one after the other, each from its inputs through the already pruned layers before it."""
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        x = capture_inputs(model, layer, data)
        w = weight_columns(layer)
        pruned = ref_wanda(w, x, n, m) if method == "wanda" else ref_sparsegpt(w, ref_hessian(x), n, m)
        with torch.no_grad():
            layer.weight.copy_(pruned)
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 8)])
def test_layer_by_layer_matches_the_sequential_reference(method, n, m):
    torch.manual_seed(0)
    model = mlp((16, 32, 32, 24, 8)).double()
    reference = mlp((16, 32, 32, 24, 8)).double()
    reference.load_state_dict(model.state_dict())
    data = batches()
    report = maxq.calibrate_(model, data, method=method, n=n, m=m, blocksize=8)
    names = [r.name for r in report.pruned]
    assert names == ["0", "2", "4"]  # the last classifier stays dense by default
    assert [r.rows for r in report.pruned] == [18, 18, 18]  # every row of every batch
    sequential_reference(reference, names, data, method, n, m)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert maxq.check_nm(model, n, m, names).ok


def test_later_layers_see_the_pruned_inputs():
    """Calibrating every layer from the dense model's inputs is a different (worse-informed) result."""
    torch.manual_seed(0)
    model, dense_inputs = mlp((16, 32, 32, 8)).double(), mlp((16, 32, 32, 8)).double()
    dense_inputs.load_state_dict(model.state_dict())
    data = batches()
    maxq.calibrate_(model, data, method="sparsegpt", n=2, m=4)
    x = capture_inputs(dense_inputs, dense_inputs[2], data)  # layer 2's inputs before layer 0 was pruned
    stale = ref_sparsegpt(weight_columns(dense_inputs[2]), ref_hessian(x), 2, 4)
    assert not torch.allclose(model[2].weight, stale)


def gpt2(layers=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config).double().eval()


def tokens(count=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(count)]


def test_gpt2_conv1d_along_inputs_first_layer_matches_reference_rest_untouched():
    model = gpt2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    first_input = capture_inputs(model, model.transformer.h[0].attn.c_attn, [t["input_ids"] for t in tokens()])
    report = maxq.calibrate_(model, tokens(), method="sparsegpt", n=2, m=4)
    conv1d = [f"transformer.h.{i}.{part}" for i in range(2) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]  # fmt: skip
    assert [r.name for r in report.pruned] == conv1d
    assert "lm_head" in [r.name for r in report.skipped]  # tied to the embedding
    assert maxq.check_nm(model, 2, 4, conv1d).ok  # along the inputs, dim 0 of the stored [in, out] weight
    # The first layer's inputs do not depend on any pruning: its result is the reference's on them.
    want = ref_sparsegpt(original["transformer.h.0.attn.c_attn.weight"].t(), ref_hessian(first_input), 2, 4)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight.t(), want, rtol=1e-9, atol=1e-10)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"{name}.weight" for name in conv1d}  # embeddings, norms, biases, buffers: bit for bit


def test_only_selected_layers_change_bit_for_bit_and_mode_is_restored():
    torch.manual_seed(0)
    model = small_cnn()
    model.train()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    report = maxq.calibrate_(model, data, method="wanda", filter_fn=lambda mod, name: name == "3")
    assert [r.name for r in report.pruned] == ["3"]
    assert model.training and all(mod.training for mod in model.modules())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {"3.weight"}  # BatchNorm statistics included: calibration runs in eval mode


def test_conv2d_blocks_along_input_channels_match_reference():
    torch.manual_seed(0)
    model = small_cnn().double().eval()
    data = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    conv = model[3]
    x = capture_inputs(model, conv, data)  # the first conv stays dense by default: conv 3's inputs are fixed
    want = ref_sparsegpt(weight_columns(conv), ref_hessian(x), 2, 4)
    report = maxq.calibrate_(model, data, method="sparsegpt", n=2, m=4, blocksize=16)
    assert [r.name for r in report.pruned] == ["3", "6", "10"]
    assert report.pruned[0].rows == x.shape[0] == 2 * 4 * 8 * 8  # one row per output position
    torch.testing.assert_close(weight_columns(conv), want, rtol=1e-9, atol=1e-10)
    assert maxq.check_nm(model, 2, 4, ["3", "6", "10"]).ok


class Attention(nn.Module):
    """q, k and v read the same tensor; a tail after the last layer counts its calls."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.tail = nn.Linear(d, 4)
        self.tail_calls = 0

    def forward(self, x):
        h = torch.relu(self.inp(x))
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        out = torch.relu(self.o(a))
        self.tail_calls += 1
        return self.tail(out)


def test_shared_input_is_one_group_and_forwards_stop_after_the_group():
    model = Attention().double()
    data = [torch.randn(3, 6, 16, dtype=torch.float64) for _ in range(4)]
    names = {"inp", "q", "k", "v", "o"}
    modules = {name: getattr(model, name) for name in names}
    groups, counts = _trace(model, modules, data[0], default_forward)
    assert [g.names for g in groups] == [["inp"], ["q", "k", "v"], ["o"]] and set(counts.values()) == {1}
    model.tail_calls = 0
    report = maxq.calibrate_(model, data, method="sparsegpt")
    assert {r.name for r in report.pruned} == names
    assert model.tail_calls == 1  # the trace; every statistics pass stopped at its group's last layer
    assert {r.rows for r in report.pruned} == {4 * 3 * 6}


def test_oneshot_mask_after_calibration_is_the_calibrated_mask():
    torch.manual_seed(0)
    model = mlp((16, 32, 32, 8))
    maxq.calibrate_(model, batches(dtype=torch.float32), method="sparsegpt", n=2, m=4)
    calibrated = {name: module.weight.detach().clone() for name, module in model.named_modules()
                  if isinstance(module, nn.Linear)}  # fmt: skip
    sparsifier = maxq.sparsify_(model, maxq.OneShotConfig(n=2, m=4))
    masks = dict(sparsifier.named_masks())
    assert set(masks) == {"0", "2"}
    for name, mask in masks.items():
        assert torch.equal(mask.bool(), calibrated[name] != 0)  # exactly the calibrated survivors
    x = batches(dtype=torch.float32)[0]
    maxq.fold_(model)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in calibrated.items())
    assert model(x).shape == (5, 8)


def test_kept_zero_is_counted_and_oneshot_keeps_the_same_weights():
    """Tie case: a block with more than m - n zeros. The magnitude mask picks among the zeros by the lower input,
    which may differ from the calibrated choice, but the weights (W * mask) are the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # wanda keeps 1.0 and one of the zeros
    report = maxq.calibrate_(model, [torch.randn(6, 8)], method="wanda", n=2, m=4)
    assert report.pruned[0].kept_zeros == 1
    weights = model[0].weight.detach().clone()
    sparsifier = maxq.sparsify_(model, maxq.OneShotConfig(n=2, m=4))
    assert torch.equal(model[0].weight, weights)  # W * mask: identical
    assert (dict(sparsifier.named_masks())["0"].reshape(4, 2, 4).sum(-1) == 2).all()


def test_magnitude_needs_no_data_and_equals_oneshot():
    torch.manual_seed(0)
    model, other = mlp(), mlp()
    other.load_state_dict(model.state_dict())
    report = maxq.calibrate_(model, None, method="magnitude")
    assert report.batches == 0 and [r.rows for r in report.pruned] == [0, 0]
    maxq.sparsify_(other, maxq.OneShotConfig())
    maxq.fold_(other)
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in model.state_dict().items())


def test_batches_drawn_once_from_a_generator_and_dict_batches():
    model = gpt2(layers=1)
    drawn = []

    def stream():
        for i, batch in enumerate(tokens(count=10)):
            drawn.append(i)
            yield batch

    report = maxq.calibrate_(model, stream(), method="wanda", batches=3)
    assert report.batches == 3 and drawn == [0, 1, 2, 3]  # the 4th is drawn to learn the stream goes on
    assert {r.rows for r in report.pruned} == {3 * 2 * 12}


def test_layer_the_forward_never_reaches_is_skipped():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.a(x))

    report = maxq.calibrate_(Unused(), [torch.randn(4, 8)], method="wanda")
    assert [r.name for r in report.pruned] == ["a"]
    assert "not called" in next(r.skipped for r in report.layers if r.name == "b")
    assert "calibration=wanda 2:4" in str(report) and report.to_dict()["layers"][0]["name"] == "a"


def test_errors_say_what_to_do():
    model = mlp()
    with pytest.raises(ValueError, match="needs calibration data"):
        maxq.calibrate_(model, None, method="wanda")
    with pytest.raises(ValueError, match="yielded no batch"):
        maxq.calibrate_(model, [], method="sparsegpt")
    with pytest.raises(ValueError, match="not both"):
        maxq.calibrate_(model, [torch.randn(2, 32)], CalibrationConfig(), method="wanda")
    with pytest.raises(ValueError, match="batches=K"):
        maxq.calibrate_(model, range(5000), method="wanda")
    with pytest.raises(ValueError, match="strict mode"):
        maxq.calibrate_(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2)), [torch.randn(2, 6)], method="wanda",
                        strict=True, filter_fn=lambda mod, name: True)  # fmt: skip
    maxq.sparsify_(model, maxq.OneShotConfig())
    with pytest.raises(ValueError, match="already sparsified"):
        maxq.calibrate_(model, [torch.randn(2, 32)], method="wanda")
