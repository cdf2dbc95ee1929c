"""The layer-as-matrix views: ``input_columns(x) @ weight_columns().T`` is the layer's output without bias, for
Linear, HF Conv1D and every Conv2d geometry; N:M blocks are consecutive columns; writing back is exact."""

import pytest
import torch
from torch import nn

from maxq.calibrate import input_columns, weight_columns, write_columns_
from maxq.core.nm import nm_mask, oi_view

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), (3, 5, 12)),
    "conv1d_hf": (lambda: Conv1D(8, 12), (3, 5, 12)),
    "conv": (lambda: nn.Conv2d(8, 6, 3, padding=1), (2, 8, 7, 7)),
    "conv_strided_dilated": (lambda: nn.Conv2d(8, 6, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0)), (2, 8, 9, 9)),
    "conv_same_reflect": (lambda: nn.Conv2d(4, 5, 3, padding="same", padding_mode="reflect"), (2, 4, 6, 6)),
    "conv_1x1_unbatched": (lambda: nn.Conv2d(8, 4, 1), (8, 5, 5)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_columns_reproduce_the_layer(kind):
    make, shape = LAYERS[kind]
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        bias = layer.bias
        if isinstance(layer, nn.Conv2d):  # [..., O, H, W] -> rows (b, h, w) x O
            out = (out if out.dim() == 4 else out.unsqueeze(0)) - bias.view(-1, 1, 1)
            out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        else:
            out = (out - bias).reshape(-1, out.shape[-1])
    got = input_columns(layer, x) @ weight_columns(layer).t()
    torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_blocks_are_consecutive_columns_and_write_back_is_exact(kind):
    layer = LAYERS[kind][0]()
    before = layer.weight.detach().clone()
    columns = weight_columns(layer)
    assert columns.dtype == torch.float32 and columns.data_ptr() != layer.weight.data_ptr()  # a copy
    # the library's N:M blocks of the stored weight are blocks of 4 consecutive columns
    stored_mask = nm_mask(oi_view(layer.weight.detach(), 0 if kind == "conv1d_hf" else 1), 2, 4)
    column_mask = nm_mask(columns, 2, 4)
    pruned = columns * column_mask
    write_columns_(layer, pruned)
    assert torch.equal(oi_view(layer.weight.detach() != 0, 0 if kind == "conv1d_hf" else 1), stored_mask)
    assert torch.equal(weight_columns(layer), pruned)
    assert torch.equal(layer.weight.detach()[layer.weight.detach() != 0], before[layer.weight.detach() != 0])


def test_write_keeps_the_stored_dtype():
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    columns = weight_columns(layer)
    assert columns.dtype == torch.float32
    write_columns_(layer, columns * 0.5)
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight_columns(layer), columns * 0.5)
