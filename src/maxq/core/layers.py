"""Which layers of a model get N:M masks (METHOD.md §1), as a pure query over the model.

Eligible: ``nn.Conv2d`` with ``groups == 1`` and ``nn.Linear`` (subclasses included) whose input size is
divisible by ``m``. By default the network's first conv and its last classifier (the last Conv2d/Linear in
registration order) stay dense. A ``filter_fn(module, qualified_name) -> bool`` replaces the default choice;
eligibility still applies, and every layer not sparsified is reported with its reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FilterFn", "LayerChoice", "input_axis", "is_hf_conv1d", "is_weight_layer", "select_layers"]

FilterFn = Callable[[nn.Module, str], bool]

_SUPPORTED = (nn.Conv2d, nn.Linear)
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (or a subclass), recognised without importing transformers:
    a class named ``Conv1D`` from a ``transformers.`` module, with ``nf`` outputs and a 2-D ``[in, out]`` weight."""
    if not any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__):
        return False
    weight = getattr(module, "weight", None)
    return hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer kind N:M masks apply to (Conv2d, Linear, HF Conv1D), eligible or not."""
    return isinstance(module, _SUPPORTED) or is_hf_conv1d(module)


def input_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` that runs over its inputs, where the N:M blocks lie: 0 for HF ``Conv1D``
    (stored ``[in, out]``), 1 for Linear ``[out, in]`` and Conv2d ``[out, in, kh, kw]``."""
    return 0 if is_hf_conv1d(module) else 1


@dataclass(frozen=True)
class LayerChoice:
    """One candidate layer and the decision about it."""

    name: str
    kind: str
    shape: tuple[int, ...]
    selected: bool
    reason: str = ""  # why it is not sparsified (empty when selected)
    requested: bool = False  # the selection rule asked for it (strict mode turns its skip into an error)


def _ineligible(module: nn.Module, m: int, tied: str = "") -> str:
    """Reason ``module`` cannot carry an N:M mask along its inputs, or ``""``."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy layer not initialized yet (run one forward first)"
    if tied:
        return f"weight shared with {tied} (tied)"
    if is_hf_conv1d(module):
        inputs = module.weight.shape[0]
        return f"input features {inputs} not divisible by m={m}" if inputs % m else ""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} conv (groups={module.groups}): no input-channel blocks"
        if module.in_channels % m:
            return f"input channels {module.in_channels} not divisible by m={m}"
        return ""
    if module.in_features % m:
        return f"input features {module.in_features} not divisible by m={m}"
    return ""


def _check_filter_fn(filter_fn: FilterFn) -> None:
    """``filter_fn`` must be callable as ``filter_fn(module, qualified_name)``; ``TypeError`` saying so if not."""
    what = getattr(filter_fn, "__qualname__", type(filter_fn).__name__)
    if not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, qualified_name) -> bool, got {what}")
    try:
        signature = inspect.signature(filter_fn)
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return
    try:
        signature.bind(nn.Identity(), "layer")
    except TypeError as exc:
        raise TypeError(
            f"filter_fn must take two arguments, (module, qualified_name), and return a bool, e.g. "
            f"lambda module, name: not name.startswith('head'); {what}{signature} cannot be called that way ({exc})"
        ) from None


#: why nn.MultiheadAttention's packed projections stay dense
ATTENTION_REASON = (
    "packed Q/K/V projection of nn.MultiheadAttention: a raw parameter its attention op reads directly, not a "
    "Linear module, so maxq keeps it dense (its out_proj is a Linear and is sparsified); for N:M Q/K/V use "
    "attention built from nn.Linear layers (timm, Hugging Face)"
)


def _attention_projections(module: nn.MultiheadAttention, name: str, requested: bool) -> list[LayerChoice]:
    """``nn.MultiheadAttention``'s Q/K/V projection weights (``in_proj_weight``, or ``q/k/v_proj_weight``), listed
    as dense with the reason, so that the report names them rather than silently leaving them out."""
    names = ("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    out = []
    for tensor in names:
        weight = getattr(module, tensor, None)
        if weight is None:
            continue
        label = f"{name}.{tensor}" if name else tensor
        out.append(LayerChoice(label, "MultiheadAttention", tuple(weight.shape), False, ATTENTION_REASON, requested))
    return out


def select_layers(
    model: nn.Module,
    m: int,
    filter_fn: FilterFn | None = None,
    *,
    skip_first: bool = True,
    skip_last: bool = True,
) -> list[LayerChoice]:
    """Decide, for every Conv/Linear-like layer of ``model``, whether it gets an N:M mask of block size ``m``.

    Args:
        model: any ``nn.Module``.
        m: the block size (a layer is eligible only if ``m`` divides its input size).
        filter_fn: ``(module, qualified_name) -> bool``; when given, it alone decides which eligible layers are
            requested (``skip_first`` / ``skip_last`` apply only to the default selection).
        skip_first: keep the first conv dense.
        skip_last: keep the last Conv2d/Linear (the classifier) dense.

    Raises:
        TypeError: ``filter_fn`` cannot be called as ``filter_fn(module, name)``.

    Returns:
        one `LayerChoice` per candidate layer, in registration order, with the reason a layer stays dense.
    """
    if filter_fn is not None:
        _check_filter_fn(filter_fn)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if is_weight_layer(mod) or isinstance(mod, (*_UNSUPPORTED, nn.MultiheadAttention))
    ]
    supported = [(name, mod) for name, mod in candidates if is_weight_layer(mod)]
    if filter_fn is not None:  # the packed projections below are reported with the filter's verdict
        requested_by = filter_fn
    else:
        requested_by = lambda mod, name: True  # noqa: E731
    owners: dict[int, list[str]] = {}  # parameter -> every module that holds it (tied weights: more than one)
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname.rpartition(".")[0])
    first_conv = next((name for name, mod in supported if isinstance(mod, nn.Conv2d)), None)
    last_layer = supported[-1][0] if supported else None
    choices = []
    for name, mod in candidates:
        weight = getattr(mod, "weight", None)
        shape = () if weight is None or isinstance(weight, nn.UninitializedParameter) else tuple(weight.shape)
        kind = type(mod).__name__
        if isinstance(mod, nn.MultiheadAttention):
            choices += _attention_projections(mod, name, bool(requested_by(mod, name)))
            continue
        if not is_weight_layer(mod):
            choices.append(LayerChoice(name, kind, shape, False, f"unsupported layer type {kind}"))
            continue
        if filter_fn is not None:
            requested = bool(filter_fn(mod, name))
            default_reason = "not selected by filter_fn"
        elif skip_first and name == first_conv:
            requested, default_reason = False, "first conv (kept dense by default)"
        elif skip_last and name == last_layer:
            requested, default_reason = False, "last classifier (kept dense by default)"
        else:
            requested, default_reason = True, ""
        weight_param = mod._parameters.get("weight")
        others = [o for o in owners.get(id(weight_param), []) if o != name] if weight_param is not None else []
        reason = _ineligible(mod, m, others[0] if others else "") if requested else default_reason
        choices.append(LayerChoice(name, kind, shape, requested and not reason, reason, requested))
    return choices
