"""Kept-index codes (maxq.core.codes): the bit plane a code holds comes back bit for bit on either path, and a mask
held as a code trains, saves and loads exactly as the same mask held as a bit plane."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import maxq
from maxq.core import codes, parametrization
from maxq.core.bits import pack_rows, unpack_rows

CODED = [(1, 2), (1, 3), (1, 4), (1, 5), (2, 7), (1, 8), (2, 8), (1, 16), (3, 16), (1, 64)]


def _exact_planes(rows: int, blocks: int, kernel: int, n: int, m: int, seed: int) -> torch.Tensor:
    """A random exact N:M bit plane: uint8 ``[1, rows, ceil(L / 8)]``, ``L = blocks * m * kernel``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(rows, blocks, kernel, m, generator=g).argsort(-1)  # a random ranking in every block
    kept = order < n  # [rows, I / m, K, m]: exactly n a block
    return pack_rows(kept.transpose(2, 3).reshape(rows, -1)).unsqueeze(0)


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from(CODED),
    rows=st.integers(1, 5),
    blocks=st.integers(1, 4),
    kernel=st.sampled_from([1, 2, 9]),
    seed=st.integers(0, 2**16),
)
def test_the_code_gives_back_its_bit_plane_on_both_paths(pattern, rows, blocks, kernel, seed):
    n, m = pattern
    length = blocks * m * kernel
    planes = _exact_planes(rows, blocks, kernel, n, m, seed)
    width = codes.code_width(length, n, m)
    assert width < planes.shape[-1] or width * 8 - blocks * kernel * n * codes.index_bits(m) < 8  # never larger
    fused_code = codes.encode_kept_(torch.empty(1, rows, width, dtype=torch.uint8), planes, n, m, length, kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codes, "_fused", lambda t: False)
        eager_code = codes.encode_kept_(torch.empty(1, rows, width, dtype=torch.uint8), planes, n, m, length, kernel)
        eager_back = codes.decode_kept(fused_code, n, m, length, kernel)
        mp.setattr(codes, "rows_per_chunk", lambda length, device: 1)  # a row a chunk: the chunks' seams
        row_code = codes.encode_kept_(torch.empty(1, rows, width, dtype=torch.uint8), planes, n, m, length, kernel)
        row_back = codes.decode_kept(fused_code, n, m, length, kernel)
    assert torch.equal(fused_code, eager_code) and torch.equal(fused_code, row_code)
    assert torch.equal(codes.decode_kept(fused_code, n, m, length, kernel), planes)
    assert torch.equal(eager_back, planes) and torch.equal(row_back, planes)
    assert codes.exact_blocks(planes, n, m, length, kernel)


def test_the_code_is_the_kept_positions_in_block_order():
    """1:4 on one row of two blocks at two kernel positions: block g = (i // 4) * K + k keeps position x, i = 4 * (g
    // K) + x, i.e. row entry i * K + k; two bits per block, lowest first."""
    kept = torch.zeros(8, 2, dtype=torch.bool)  # [I, K]
    for i, k in ((2, 0), (1, 1), (7, 0), (4, 1)):  # blocks (0, 0), (0, 1), (1, 0), (1, 1) keep 2, 1, 3, 0
        kept[i, k] = True
    planes = pack_rows(kept.reshape(1, -1)).unsqueeze(0)
    code = codes.encode_kept_(torch.empty(1, 1, 1, dtype=torch.uint8), planes, 1, 4, 16, 2)
    assert code.item() == 2 | 1 << 2 | 3 << 4 | 0 << 6


def test_a_block_that_keeps_other_than_n_is_not_an_exact_plane():
    n, m, kernel, length = 1, 8, 9, 2 * 8 * 9
    planes = _exact_planes(3, 2, kernel, n, m, seed=1)
    bits = unpack_rows(planes[0], length)
    bits[1, 5] = ~bits[1, 5]  # one block now keeps 0 or 2
    bad = pack_rows(bits).unsqueeze(0)
    assert not codes.exact_blocks(bad, n, m, length, kernel)
    code = torch.empty(1, 3, codes.code_width(length, n, m), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="keeps other than n = 1"):  # the fused kernel checks as it encodes
        codes.encode_kept_(code, bad, n, m, length, kernel)


def test_which_masks_are_coded():
    assert codes.uses_code(1, 16, soft=False, exact=True)
    assert codes.uses_code(2, 8, soft=False, exact=True)  # 6 bits < 8
    assert not codes.uses_code(2, 4, soft=False, exact=True)  # 4 bits either way
    assert not codes.uses_code(4, 8, soft=False, exact=True)  # 12 bits > 8
    assert not codes.uses_code(1, 16, soft=True, exact=True)  # MaxQ's soft planes
    assert not codes.uses_code(1, 16, soft=False, exact=False)  # the ramp keeps blocks whole


class _Net(nn.Module):
    """A 3x3 conv (kernel positions), a channels-last 1x1 conv, Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.point = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        x = torch.relu(self.point(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def _gpt2() -> nn.Module:
    """A 2-layer GPT-2 (HF ``Conv1D`` layers: ``[in, out]`` weights, the transposed layout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64)
    return GPT2LMHeadModel(config)


def _run(method: str, n: int, m: int, steps: int = 3, state: dict | None = None, model: str = "net"):
    torch.manual_seed(0)
    net = _gpt2() if model == "gpt2" else _Net()
    if model == "net":
        net.point.to(memory_format=torch.channels_last)
    sp = maxq.sparsify_(net, maxq.make_config(method, n=n, m=m))
    if state is not None:
        sp.load_state_dict(state)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad(set_to_none=True)
        if model == "gpt2":
            ids = torch.randint(0, 64, (2, 16), generator=g)
            loss = net(input_ids=ids, labels=ids).loss
        else:
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        sp.regularize_()
        opt.step()
        sp.step()
        losses.append(loss.detach().view(torch.int32).item())
    saved = sp.state_dict()
    held = sum(sp.mask_bytes().values())
    coded = [name for name in sp.layers if sp._layers[name].param.coded]
    sp.fold_()
    folded = {k: v.view(torch.int32) for k, v in net.state_dict().items() if v.is_floating_point()}
    return losses, saved, folded, held, coded


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k]["planes"], b[k]["planes"]) and torch.equal(a[k]["thresholds"], b[k]["thresholds"]) for k in a
    )


_CASES = [(method, n, m, "net") for method in ("srste", "oneshot") for n, m in ((1, 4), (2, 8), (1, 16))]


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["fused", "eager"])
@pytest.mark.parametrize("method,n,m,model", [*_CASES, ("srste", 1, 8, "gpt2")])
def test_a_coded_mask_trains_bit_for_bit_as_its_bit_plane(monkeypatch, method, n, m, model, kernels):
    if model == "gpt2":
        pytest.importorskip("transformers")
    monkeypatch.setenv("MAXQ_CPU_KERNELS", kernels)
    losses, saved, folded, held, coded = _run(method, n, m, model=model)
    assert coded  # the layers this pattern fits hold codes
    with monkeypatch.context() as mp:
        mp.setattr(parametrization, "uses_code", lambda *a: False)
        ref_losses, ref_saved, ref_folded, ref_held, ref_coded = _run(method, n, m, model=model)
    assert not ref_coded
    assert losses == ref_losses
    assert _same_state(saved["layers"], ref_saved["layers"])  # the saved state: bit planes either way
    assert folded.keys() == ref_folded.keys() and all(torch.equal(folded[k], ref_folded[k]) for k in folded)
    assert held < ref_held


def test_states_load_across_the_two_ways_of_holding_a_mask(monkeypatch):
    """The saved state is the bit plane either way: a state saved by a bit-plane sparsifier (an earlier maxq) loads
    into a coded one as the same masks and resumes the same, and back."""
    _, saved, *_ = _run("srste", 1, 8, steps=2)  # coded
    with monkeypatch.context() as mp:
        mp.setattr(parametrization, "uses_code", lambda *a: False)
        _, plain_saved, *_ = _run("srste", 1, 8, steps=2)
        _, into_plain, *_ = _run("srste", 1, 8, steps=0, state=saved)
        from_coded = _run("srste", 1, 8, steps=2, state=saved)
    _, into_coded, *_ = _run("srste", 1, 8, steps=0, state=plain_saved)
    from_plain = _run("srste", 1, 8, steps=2, state=plain_saved)
    assert _same_state(saved["layers"], plain_saved["layers"])
    assert _same_state(into_plain["layers"], saved["layers"]) and _same_state(into_coded["layers"], saved["layers"])
    assert from_coded[0] == from_plain[0]
    assert _same_state(from_coded[1]["layers"], from_plain[1]["layers"])


def test_a_state_that_is_not_exact_n_m_is_refused_with_the_layer_named_before_anything_is_written():
    torch.manual_seed(0)
    sp = maxq.sparsify_(_Net(), maxq.make_config("srste", n=1, m=8))
    before = sp.state_dict()["layers"]
    torch.manual_seed(1)  # another model's masks: every layer's differ from this one's
    state = maxq.sparsify_(_Net(), maxq.make_config("srste", n=1, m=8)).state_dict()
    assert list(state["layers"])[-1] == "fc"
    state["layers"]["fc"]["planes"][0, 0, 0] ^= 1  # the last layer's mask: a block keeps 0 or 2
    with pytest.raises(ValueError, match="mask of fc keeps other than 1 of some block of 8"):
        sp.load_state_dict(state)
    assert _same_state(sp.state_dict()["layers"], before)  # the layers before it were not loaded either
    assert not torch.equal(state["layers"]["conv"]["planes"], before["conv"]["planes"])


@pytest.mark.parametrize("method", ["srste", "oneshot"])
def test_compiled_coded_training_equals_eager(method):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _Net()
        sp = maxq.sparsify_(model, maxq.make_config(method, n=1, m=8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fwd = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        losses = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = fwd(x).square().mean()
            loss.backward()
            sp.regularize_()
            opt.step()
            sp.step()
            losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (losses, params) = results
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(eager_params, params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_maxq_0_2_state_of_whole_float_masks_loads_into_codes():
    """The format before bit planes (``maxq.sparsifier/2``: a float mask per layer) loads into a coded sparsifier as
    the same masks; one that is not exactly N:M is refused."""
    torch.manual_seed(0)
    sp = maxq.sparsify_(_Net(), maxq.make_config("srste", n=1, m=8))
    masks = dict(sp.named_masks())
    state = sp.state_dict()
    state["format"] = "maxq.sparsifier/2"
    state["layers"] = {name: {"mask": mask.clone(), "dense_fraction": 0.0} for name, mask in masks.items()}
    torch.manual_seed(1)
    other = maxq.sparsify_(_Net(), maxq.make_config("srste", n=1, m=8))
    assert any(not torch.equal(m, masks[k]) for k, m in other.named_masks())
    other.load_state_dict(state)
    assert all(layer.param.coded for layer in other._layers.values())
    assert all(torch.equal(m, masks[k]) for k, m in other.named_masks())
    state["layers"]["point"]["mask"][0, :2] = 1.0  # two kept in the first block of 8
    with pytest.raises(ValueError, match="mask of point keeps other than 1"):
        other.load_state_dict(state)
