"""Fold the masks into plain weights: ``W <- W * Mask`` and no masking machinery left (METHOD.md §6)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layout import LAYOUT_ATTR, NMLayout
from .parametrization import NMMask
from .sharding import is_dtensor, move_fsdp_param, remove_weight_parametrization, row_sharding
from .sparsifier import sparsifier_of

__all__ = ["LAYOUT_ATTR", "fold_", "nm_layout"]

log = logging.getLogger(__name__)


def _masked_layers(model: nn.Module) -> list[tuple[str, nn.Module, NMMask]]:
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, NMMask):
                    found.append((name, module, p))
    return found


def nm_layout(model: nn.Module) -> NMLayout | None:
    """The `NMLayout` a model carries, sparsified or folded, with layer names relative to
    ``model`` (sub-modules sparsified separately are merged); ``None`` if it carries none."""
    found = []
    for prefix, module in model.named_modules():
        sparsifier = sparsifier_of(module)
        layout = sparsifier.layout if sparsifier is not None else getattr(module, LAYOUT_ATTR, None)
        if layout is not None:
            found.append(NMLayout.from_dict(layout, f"{prefix or 'model'}.{LAYOUT_ATTR}").prefixed(prefix))
    return NMLayout.merge(found)


def fold_(model: nn.Module, force: bool = False) -> nn.Module:
    """Replace every masked weight by ``W * Mask`` and remove the parametrizations, in place.

    The result is a plain model of the same classes whose eval outputs equal the masked model's (it folds the
    mask eval mode uses). Parameter identity is kept, so an optimizer holding the parameters stays valid. The
    root module records its layout in ``model.maxq_layout`` for [`maxq.check_nm`][maxq.check_nm].

    Args:
        model: a model sparsified with [`maxq.sparsify_`][maxq.sparsify_] (or a module containing one).
        force: fold even though the incremental ramp is unfinished: the remaining dense blocks are pruned to
            N:M from the current weights first (logged as a warning).

    Raises:
        RuntimeError: blocks are still dense (ramp unfinished) and ``force`` is false.
        ValueError: the model carries no maxq masks.
    """
    layers = _masked_layers(model)
    if not layers:
        if nm_layout(model) is not None:
            return model  # already folded
        raise ValueError("model carries no maxq masks: nothing to fold (sparsify it with maxq.sparsify_ first)")
    sparsifiers = {id(s): s for m in model.modules() if (s := sparsifier_of(m)) is not None}
    unfinished = [s for s in sparsifiers.values() if not s.ramp_finished]
    if unfinished and not force:
        p = max(s.dense_fraction for s in unfinished)
        count = sum(len(s.layers) for s in unfinished)
        raise RuntimeError(
            f"the sparsity ramp is unfinished: {count} layer(s) still keep up to {p:.1%} of their blocks "
            f"dense, so folding now would not give an N:M model. Train until the ramp end, or call "
            f"fold_(model, force=True) to prune the remaining dense blocks now."
        )
    for sparsifier in unfinished:
        log.warning(
            "maxq: folding with an unfinished ramp: pruning dense blocks of %d layer(s) now", len(sparsifier.layers)
        )
        sparsifier.finish_ramp()
    layouts = {key: s.layout for key, s in sparsifiers.items()}
    roots = [s.model for s in sparsifiers.values()]
    for _, module, param in layers:  # each folds exactly the mask its next forward would use
        original = module.parametrizations.weight.original
        if is_dtensor(original):  # sharded (FSDP2): every rank folds its own rows, and the weight stays sharded
            sharding = row_sharding(original, param.input_axis)
            with torch.no_grad():
                local = original.to_local()
                local.copy_(param.effective_local(local, sharding.offset))
            remove_weight_parametrization(module)
            for root in roots:
                move_fsdp_param(root, original, module, "weight")
        else:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        with torch.no_grad():
            weight = module.weight
            (weight.to_local() if is_dtensor(weight) else weight).add_(0.0)  # -0.0 from W * 0 becomes +0.0
    for key, sparsifier in sparsifiers.items():
        root = sparsifier.model
        sparsifier._detach()
        setattr(root, LAYOUT_ATTR, layouts[key])
    return model
