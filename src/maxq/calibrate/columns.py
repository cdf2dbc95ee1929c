"""A layer as a matrix product ``Y = X W^T``: its weight as ``[O, D]`` and its inputs as ``[T, D]``, with the
N:M blocks as ``m`` consecutive columns.

Calibrated pruning reasons about one output row of ``W`` against the input columns of ``X`` that it multiplies.
Every layer kind maps to that form, with the blocks of the library's convention (``maxq.core.nm``: ``m``
consecutive inputs of one output):

* ``nn.Linear`` ``W[O, I]``: ``D = I``; ``X`` is the input with every leading axis flattened.
* Hugging Face ``Conv1D`` ``W[I, O]`` (forward ``x @ W + b``): the transposed weight; ``X`` as for Linear.
* ``nn.Conv2d`` ``W[O, I, kh, kw]`` (``groups == 1``): ``D = kh * kw * I`` ordered ``(kh, kw, i)``, so that a
  block (``m`` consecutive input channels at one kernel position) is ``m`` consecutive columns; ``X`` holds the
  im2col patches in the same order, one row per output position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.layers import input_axis
from ..core.nm import oi_view

__all__ = ["compute_dtype", "input_columns", "weight_columns", "write_columns_"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype calibration computes in for weights of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_columns(module: nn.Module) -> Tensor:
    """A copy of ``module``'s weight as ``[O, D]`` (see the module doc for the column order), in float32 (float64
    for a float64 weight)."""
    w = oi_view(module.weight.detach(), input_axis(module))
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.to(compute_dtype(w.dtype), copy=True)


def write_columns_(module: nn.Module, columns: Tensor) -> None:
    """Write ``columns`` (``[O, D]``, the layout of `weight_columns`) into ``module``'s weight, in place, in its
    stored layout and dtype."""
    view = oi_view(module.weight.data, input_axis(module))
    if view.dim() == 4:
        o, i, kh, kw = view.shape
        columns = columns.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    with torch.no_grad():
        view.copy_(columns.reshape(view.shape))


def input_columns(module: nn.Module, x: Tensor) -> Tensor:
    """``module``'s input ``x`` as ``[T, D]``: one row per output position, the columns of `weight_columns`,
    so that ``input_columns(module, x) @ weight_columns(module).T`` is the layer's output without bias."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched [C, H, W]
            x = x.unsqueeze(0)
        # The conv's own padding (also for padding="same" and non-zero padding modes), then plain patches.
        pad = list(module._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
        batch, _, positions = patches.shape  # [B, C * kh * kw, L], channel slowest
        kernel = module.kernel_size[0] * module.kernel_size[1]
        patches = patches.view(batch, x.shape[1], kernel, positions).permute(0, 3, 2, 1)
        return patches.reshape(batch * positions, kernel * x.shape[1])
    return x.reshape(-1, x.shape[-1])
