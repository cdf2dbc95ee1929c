"""Fold eval-mode BatchNorm into the convolution that feeds it (METHOD.md §6): ``W' = W * gamma / sqrt(var + eps)``
per output filter, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

Scaling whole filters keeps every zero where it was, so an N:M conv stays N:M. Pairs are found by tracing the
model with ``torch.fx`` (module order is not data flow); the conv is updated in place and the BatchNorm
replaced by ``nn.Identity``, so the model keeps its classes otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_batchnorm_"]


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow and the like
        raise ValueError(f"BatchNorm folding needs an FX-traceable model: {type(exc).__name__}: {exc}") from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1  # the conv output feeds nothing else
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every ``Conv2d -> BatchNorm2d`` pair of ``model`` in place; returns the ``(conv, bn)`` names folded.

    Uses the running statistics (eval-mode semantics); call it on a folded (mask-free) model. The BatchNorm scale
    multiplies whole filters, so an N:M pattern is kept; each folded BatchNorm becomes ``nn.Identity``.

    Args:
        model: a folded model (after [`maxq.fold_`][maxq.fold_]), or any model without maxq masks.

    Raises:
        ValueError: the model still carries N:M masks.
    """
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ValueError("fold the N:M masks first (maxq.fold_), then BatchNorm")
    pairs = _conv_bn_pairs(model)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        scale = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        )
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.weight.add_(0.0)  # -0.0 (a zero times a negative scale) -> +0.0: same value, canonical bits
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * scale + shift
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, nn.Identity())
    return pairs
