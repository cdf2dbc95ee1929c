"""Masks cost bits, not copies: what maxq adds to a model's training memory, counted from the tensors themselves.

Two parts make up everything maxq adds: the buffers it holds per layer (the mask state, the random order's
priorities, the fused kernels' guesses: ``Sparsifier.mask_bytes``, checked against the buffers themselves) and the
tensors autograd saves for backward that a dense model would not save. The bounds (in units of the sparsified
layers' weight bytes): 0.10 for one-shot, 0.15 for SR-STE, 0.35 for MaxQ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maxq
from maxq.core import saving
from maxq.core.parametrization import NMMask

from ..conftest import PATTERNS

# Where PyTorch cannot tell whether other saved-tensor hooks are active (2.4), maxq's stand aside and the op keeps
# W * mask as it would without maxq: the tests of dropping that copy do not apply.
needs_hooks = pytest.mark.skipif(
    saving._TOP_HOOKS is None, reason="this PyTorch cannot tell whether other saved-tensor hooks are active"
)

GOALS = {"oneshot": 0.10, "srste": 0.15, "maxq": 0.35}


def _config(method: str, n: int, m: int) -> maxq.NMConfig:
    options = {"ramp": (0.0, 0.0)} if method == "maxq" else {}
    return maxq.make_config(method, n=n, m=m, **options)


class _Net(nn.Module):
    """Layers of realistic width: a 3x3 conv (kernel query), a 1x1 conv, Linears, as one classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.point = nn.Conv2d(64, 128, 1)
        self.fc1 = nn.Linear(128, 256)
        self.norm = nn.LayerNorm(256)
        self.fc2 = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(torch.relu(self.stem(x)))))
        x = torch.relu(self.point(x)).mean((2, 3))
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def _weight_bytes(sp: maxq.Sparsifier) -> dict[str, int]:
    modules = dict(sp.model.named_modules())
    out = {}
    for name in sp.layers:
        w = modules[name].parametrizations.weight.original
        out[name] = w.numel() * w.element_size()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("method", list(GOALS))
def test_mask_state_per_layer_is_below_the_goal(method, n, m, dtype):
    model = _Net().to(dtype)
    sp = maxq.sparsify_(model, _config(method, n, m))
    held = sp.mask_bytes()
    weights = _weight_bytes(sp)
    modules = dict(model.named_modules())
    for name in sp.layers:
        param = modules[name].parametrizations.weight[0]
        assert isinstance(param, NMMask)
        own = sum(b.numel() * b.element_size() for b in param.buffers())
        layer = sp._layers[name]
        extra = layer.state.nbytes + (0 if layer.priority is None else layer.priority.numel() * 2)
        assert held[name] >= own  # the accounting covers every buffer of the parametrization
        assert held[name] <= own + extra + 64
        assert not param.materialized  # no weight-sized mask
        ratio = held[name] / weights[name]
        assert ratio <= GOALS[method], (name, ratio)
    total = sum(held.values()) / sum(weights.values())
    assert total <= GOALS[method], total


def test_mask_state_sizes_follow_the_layout():
    """One bit per weight per plane, rows padded to bytes; two floats per query set."""
    model = _Net()
    maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 0)))
    conv = model.conv.parametrizations.weight[0]
    assert conv.planes.dtype == torch.uint8
    assert tuple(conv.planes.shape) == (3, 64, 64 * 9 // 8)  # kept, filter query, kernel query
    assert conv.thresholds.numel() == 2 * 64 + 2 * 9
    fc = model.fc1.parametrizations.weight[0]
    assert tuple(fc.planes.shape) == (2, 256, 128 // 8)  # no kernel query for a Linear
    hard = maxq.sparsify_(_Net(), maxq.SRSTEConfig(n=2, m=4))
    param = hard.model.fc2.parametrizations.weight[0]
    assert tuple(param.planes.shape) == (1, 256, 256 // 8) and param.thresholds.numel() == 0
    assert not param.coded  # 2:4: two 2-bit positions are as many bits as the plane
    # 1:16: one 4-bit position a block of 16 (a kept-index code), a quarter of the plane; the conv's 9 positions too
    coded = maxq.sparsify_(_Net(), maxq.SRSTEConfig(n=1, m=16)).model
    assert tuple(coded.fc2.parametrizations.weight[0].planes.shape) == (1, 256, 256 // 16 * 4 // 8)
    assert tuple(coded.conv.parametrizations.weight[0].planes.shape) == (1, 64, 64 // 16 * 9 * 4 // 8)
    assert coded.conv.parametrizations.weight[0].bit_planes().shape == (1, 64, 64 * 9 // 8)


def test_random_block_order_priorities_are_small_integers():
    sp = maxq.sparsify_(_Net(), maxq.MaxQConfig(ramp=(0, 1), order="random"))
    for layer in sp._layers.values():
        assert layer.priority is not None and layer.priority.dtype == torch.int16


def _saved_bytes(model: nn.Module, x: torch.Tensor, sparse: bool) -> tuple[int, int]:
    """Bytes of the tensors autograd saves in one forward that are not parameters, buffers or the input (new
    memory kept until backward), and the number of W * mask copies replaced by tokens."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)}
    seen: dict[int, int] = {}
    tokens = 0

    def record(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()

    if sparse:
        original = saving._pack

        def pack(t):
            nonlocal tokens
            out = original(t)
            if isinstance(out, saving._Token):
                tokens += 1
            else:
                record(out)
            return out

        saving._pack = pack
        try:
            out = model(x)
        finally:
            saving._pack = original
    else:

        def pack_dense(t):
            record(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_dense, lambda t: t):
            out = model(x)
    out.float().sum().backward()
    return sum(seen.values()), tokens


@needs_hooks
@pytest.mark.parametrize("method", list(GOALS))
def test_backward_keeps_no_masked_copy(method):
    torch.manual_seed(0)
    dense = _Net()
    sparse = _Net()
    sparse.load_state_dict(dense.state_dict())
    sp = maxq.sparsify_(sparse, _config(method, 2, 4))
    x = torch.randn(4, 3, 8, 8)
    dense_bytes, _ = _saved_bytes(dense, x, sparse=False)
    sparse_bytes, tokens = _saved_bytes(sparse, x, sparse=True)
    # Every sparsified layer but the first (its input needs no gradient) saved its W * mask: all were tokens.
    assert tokens == (0 if method == "oneshot" else len(sp.layers))
    extra = sparse_bytes - dense_bytes
    assert extra <= 0.01 * sum(_weight_bytes(sp).values()), extra


def test_one_shot_forward_hands_the_weight_itself_to_the_layer():
    model = _Net()
    maxq.sparsify_(model, maxq.OneShotConfig())
    original = model.fc2.parametrizations.weight.original
    assert model.fc2.weight.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()


def test_one_shot_gradient_shared_with_another_input_is_not_masked_in_place():
    """``W + P`` hands the same gradient tensor to both: masking it in place would zero part of P's gradient."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    root = nn.Sequential(layer)
    maxq.sparsify_(root, maxq.OneShotConfig(skip_last=False))
    extra = torch.zeros(8, 16, requires_grad=True)
    x = torch.randn(4, 16)
    torch.nn.functional.linear(x, layer.weight + extra).sum().backward()
    expected = torch.ones(4, 8).t() @ x  # d(sum(x @ (W + P)^T)) / dP
    torch.testing.assert_close(extra.grad, expected)
    kept = dict(root._maxq_sparsifier.named_masks())["0"] != 0
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected * kept)


@needs_hooks
@pytest.mark.parametrize("method", ["srste", "maxq"])
def test_changing_the_weight_between_forward_and_backward_is_refused(method):
    model = _Net()
    sp = maxq.sparsify_(model, _config(method, 2, 4))
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    with torch.no_grad():
        model.fc2.parametrizations.weight.original.mul_(2)
    with pytest.raises(RuntimeError, match="changed between its forward and backward"):
        loss.backward()
    assert sp is not None


@pytest.mark.parametrize("method", list(GOALS))
def test_activation_checkpointing_gives_the_same_gradients(method):
    """Checkpointing's own saved-tensor hooks take precedence (ours stand aside inside its region)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = _Net()
        maxq.sparsify_(model, _config(method, 2, 4))
        x = torch.randn(2, 3, 8, 8)
        if use_checkpoint:
            out = checkpoint(model, x, use_reentrant=False)
        else:
            out = model(x)
        out.sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=0)


def test_second_order_gradients_flow_through_the_rebuilt_weight():
    """``create_graph=True``: the W * mask rebuilt in backward carries a graph, as the kept copy did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    sp = maxq.sparsify_(model, maxq.SRSTEConfig(skip_last=False))
    masks = dict(sp.named_masks())
    x = torch.randn(4, 8, requires_grad=True)

    def penalty(net, weight_of):
        out = net(x)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return gx.pow(2).sum(), weight_of(net)

    loss, w = penalty(model, lambda net: net[2].parametrizations.weight.original)
    loss.backward()

    # Plain reference: the same network with W_eff = W * mask written out and a straight-through gradient.
    ws = {name: reference[int(name)].weight for name in masks}
    x.grad = None

    def ref_forward(inp):
        h = inp
        for i, layer in enumerate(reference):
            if isinstance(layer, nn.Linear):
                weight = layer.weight
                if str(i) in masks:
                    weight = weight + (weight * masks[str(i)] - weight).detach()
                h = torch.nn.functional.linear(h, weight, layer.bias)
            else:
                h = layer(h)
        return h

    out = ref_forward(x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    torch.testing.assert_close(w.grad, ws["2"].grad)


def test_keeping_the_soft_mask_trades_memory_for_time_with_the_same_results():
    """``keep_soft_mask=True`` holds the float mask (1x the weight bytes) and gives the same training bit for bit."""
    runs = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = _Net()
        sp = maxq.sparsify_(model, maxq.MaxQConfig(ramp=(0, 0), keep_soft_mask=keep))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sp.regularize_()
            opt.step()
            sp.step()
            losses.append(loss.item())
        ratio = sum(sp.mask_bytes().values()) / sum(_weight_bytes(sp).values())
        runs[keep] = (losses, {k: v.clone() for k, v in sp.named_masks()}, ratio)
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[True][1])
    assert runs[False][2] < 0.35 < 1.0 <= runs[True][2]
    with pytest.raises(ValueError, match="keep_soft_mask"):
        maxq.MaxQConfig(keep_soft_mask="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "input_axis"), [((12, 16), 1), ((10, 8, 3, 3), 1), ((16, 6), 0), ((9, 4, 1, 1), 1)])
@pytest.mark.parametrize(
    ("soft", "dense_fraction", "order"),
    [(False, 0.0, "smallest"), (True, 0.0, "smallest"), (True, 0.4, "random"), (False, 0.3, "largest")],
)
def test_row_chunks_give_the_whole_layer_state_and_masked_weight(
    monkeypatch, dtype, shape, input_axis, soft, dense_fraction, order
):
    """The device-agnostic paths run a large layer in row chunks (bounded temporaries): chunks of one and of three
    rows give the state and ``W * mask`` of the whole layer, bit for bit."""
    from maxq.core import masks

    n, m = 2, 4
    torch.manual_seed(3)
    weight = torch.randn(shape).to(dtype)
    weight[0, :4] = 0.5  # ties
    oi = masks.oi_view(weight, input_axis)
    planes_shape, count = masks.state_shapes(tuple(weight.shape), soft, input_axis)
    groups = oi.numel() // m
    priority = torch.randperm(groups).float() if order == "random" else None
    spec = masks.MaskSpec(n, m, soft, 0.01, input_axis, False, soft, soft)
    scale = torch.tensor([0.7, 1.3])

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        planes = torch.zeros(planes_shape, dtype=torch.uint8)
        thresholds = torch.zeros(count)
        masks.compute_state_(planes, thresholds, oi, n, m, dense_fraction=dense_fraction, order=order,
                             priority=priority, soft=soft, fused=False)  # fmt: skip
        return planes, thresholds, masks.masked_weight(weight, planes, thresholds, scale, spec)

    whole = run()
    for rows in (1, 3):
        monkeypatch.setattr(masks, "_chunk_rows", lambda w, entries=None, rows=rows: rows)
        chunked = run()
        for a, b in zip(whole, chunked):
            assert a.dtype == b.dtype and torch.equal(a, b), rows
    assert whole[2].ne(0).sum() < weight.ne(0).sum()  # something was pruned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["oneshot", "srste"])
def test_row_chunks_give_the_whole_layer_gradient(monkeypatch, method, dtype):
    """The eager paths that mask a gradient (one-shot) or add SR-STE's decay to it walk the layer in row chunks:
    chunks of one and of three rows give the gradients of the whole layer, bit for bit, and those are the
    formula's (one-shot: ``grad * kept``; SR-STE: ``grad + lambda * W * [not kept]``)."""
    from maxq.core import masks, parametrization, sparsifier

    # The eager path on every dtype (the fused CPU kernels take fp32 otherwise).
    monkeypatch.setattr(parametrization, "fused_available", lambda t: False)
    monkeypatch.setattr(sparsifier, "fused_available", lambda t: False)

    def grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.Linear(12, 3))
        model[0].to(memory_format=torch.channels_last)
        model = model.to(dtype)
        sp = maxq.sparsify_(model, _config(method, 2, 4))
        model(torch.randn(2, 4, 6, 6, dtype=dtype)).float().square().sum().backward()
        out = {}
        for name in sp.layers:  # the gradient before the decay
            out[name + ".before"] = model.get_submodule(name).parametrizations.weight.original.grad.clone()
        sp.regularize_()
        for name in sp.layers:
            param = model.get_submodule(name).parametrizations.weight
            out[name] = param.original.grad.clone()
            out[name + ".kept"] = param[0].kept()
            out[name + ".w"] = param.original.detach().clone()
        return out

    whole = grads()
    for rows in (1, 3):
        monkeypatch.setattr(masks, "_chunk_rows", lambda w, entries=None, rows=rows: rows)
        chunked = grads()
        assert whole.keys() == chunked.keys()
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), (rows, key)
    lam = _config(method, 2, 4).decay
    for name in [k for k in whole if "." not in k]:
        grad, before, kept, w = (whole[name + s] for s in ("", ".before", ".kept", ".w"))
        assert kept.shape == grad.shape and not kept.all() and kept.any()
        if method == "oneshot":  # masked in backward; no decay
            assert lam == 0 and torch.equal(grad, before) and grad[kept].ne(0).any()
            assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
        else:
            assert lam > 0 and torch.equal(grad, torch.add(before, w * (~kept).to(dtype), alpha=lam))


# -- a hard mask's weight masked in place for its backward node (no W * mask copy) --------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 and 0.0 differ, as they would in a hash of the weights)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_split_masks_in_place_and_join_puts_the_weight_back(monkeypatch, fused, layout, n, m):
    from maxq.core import masks

    if not fused:
        monkeypatch.setattr(masks, "fused_available", lambda *a, **k: False)
    torch.manual_seed(0)
    if layout == "transposed":  # HF Conv1D: [I, O] stored, its [O, I] view transposed
        w = torch.randn(4 * m, 6).t()
    else:
        w = torch.randn(6, 2 * m, 3, 3)
        if layout == "channels_last":
            w = w.contiguous(memory_format=torch.channels_last)
    w[0].zero_()  # exact zeros and -0.0 among the pruned values too
    w[1, :1].fill_(-0.0)
    planes = torch.zeros(_planes_shape(w), dtype=torch.uint8)
    masks.compute_state_(planes, None, w, n, m, soft=False)
    kept = torch.cat([k for _, _, k in masks.kept_row_chunks(w, planes)])
    before = w.clone()
    stash = masks.split_pruned_(w, planes, n, m)
    assert torch.equal(_bits(w), _bits(before * kept))  # W * mask, bit for bit
    assert stash.numel() <= w.numel() * (m - n) // m + w.shape[0]  # the pruned share, one spare slot per row
    masks.join_pruned_(w, planes, stash)
    assert torch.equal(_bits(w), _bits(before))


def _planes_shape(w: torch.Tensor) -> tuple[int, ...]:
    from maxq.core.bits import packed_width

    return (1, w.shape[0], packed_width(w[0].numel()))


def _train_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model(x).float().square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@needs_hooks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 16)])
def test_backward_masks_the_weight_in_place_with_the_rebuilds_gradients(monkeypatch, dtype, n, m):
    torch.manual_seed(0)
    base = _Net().to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    runs = []
    calls = []
    split = NMMask._split

    def counted(self, w):
        held = split(self, w)
        calls.extend([] if held is None else [1])
        return held

    monkeypatch.setattr(NMMask, "_split", counted)
    for in_place in (True, False):
        model = _Net().to(dtype)
        model.load_state_dict(base.state_dict())
        sp = maxq.sparsify_(model, _config("srste", n, m))
        if not in_place:
            monkeypatch.setattr(NMMask, "_split", lambda self, w: None)
        weights = {k: p.detach().clone() for k, p in model.named_parameters()}
        grads = _train_grads(model, x)
        for k, p in model.named_parameters():  # every weight is back, bit for bit
            assert torch.equal(_bits(p.detach()), _bits(weights[k])), k
        assert all(mod._held is None for mod in model.modules() if isinstance(mod, NMMask))
        runs.append(grads)
    # Every sparsified layer whose input needs a gradient (all but the stem) took the in-place path.
    assert len(calls) == len(sp.layers) - ("stem" in sp.layers) > 0
    for k in runs[0]:
        assert torch.equal(_bits(runs[0][k]), _bits(runs[1][k])), k


def test_input_gradient_alone_puts_the_weight_back():
    """``autograd.grad`` w.r.t. the input only: the weight's node runs, the weight's gradient never does."""
    torch.manual_seed(0)
    model = _Net()
    maxq.sparsify_(model, _config("srste", 2, 4))
    weights = {k: p.detach().clone() for k, p in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).sum(), [x])
    assert gx.abs().sum() > 0
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[k]), k


@needs_hooks
def test_a_failed_backward_node_leaves_a_weight_the_next_call_puts_back(monkeypatch):
    torch.manual_seed(0)
    model = _Net()
    sp = maxq.sparsify_(model, _config("srste", 2, 4))
    original = model.fc2.parametrizations.weight.original
    before = original.detach().clone()
    out = model(torch.randn(2, 3, 8, 8)).sum()
    # A failure as fc2's backward node returns, before its weight is put back.
    monkeypatch.setattr(NMMask, "_release", lambda self: (_ for _ in ()).throw(RuntimeError("planted")))
    with pytest.raises(RuntimeError, match="planted"):
        out.backward()
    mod = model.fc2.parametrizations.weight[0]
    assert mod._held is not None and not torch.equal(original.detach(), before)
    sp.regularize_()
    assert mod._held is None and torch.equal(original.detach(), before)
