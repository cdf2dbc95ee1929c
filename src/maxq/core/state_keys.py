"""The names of a sparsified model's weights in a state dict, and the two ways between them and a plain model's.

A sparsified layer keeps its trainable weight where ``torch.nn.utils.parametrize`` puts it,
``<layer>.parametrizations.weight.original``; a plain model (dense, or folded by [`maxq.fold_`][maxq.fold_]) keeps
it at ``<layer>.weight``. Two pure functions rename between them in place, for the load and save hooks that let a
plain state dict load into a sparsified model and a sparsified model save as a plain one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from torch import Tensor

__all__ = ["ORIGINAL", "original_to_plain_", "plain_to_original_"]

#: where a sparsified layer's trainable weight lives, under the layer's name
ORIGINAL = "parametrizations.weight.original"


def _join(prefix: str, layer: str, leaf: str) -> str:
    return f"{prefix}{layer}.{leaf}" if layer else f"{prefix}{leaf}"


def plain_to_original_(state_dict: MutableMapping[str, Any], prefix: str, layers: Iterable[str]) -> list[str]:
    """Rename ``{prefix}{layer}.weight`` to ``{prefix}{layer}.parametrizations.weight.original`` in place, for
    every layer that has the plain key and not the sparsified one (a dense or folded state dict loading into a
    sparsified model). Returns the layers renamed, in order."""
    moved = []
    for layer in layers:
        plain, original = _join(prefix, layer, "weight"), _join(prefix, layer, ORIGINAL)
        if plain in state_dict and original not in state_dict:
            state_dict[original] = state_dict.pop(plain)
            moved.append(layer)
    return moved


def original_to_plain_(state_dict: MutableMapping[str, Any], prefix: str, weights: Mapping[str, Tensor]) -> None:
    """Replace ``{prefix}{layer}.parametrizations.weight.original`` by ``{prefix}{layer}.weight`` holding
    ``weights[layer]`` (the effective weight ``W * Mask``), in place and where the old key was, for every layer of
    ``weights`` found: the state dict of a folded model, without folding."""
    renamed = {_join(prefix, layer, ORIGINAL): layer for layer in weights}
    if not any(key in renamed for key in state_dict):
        return
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        layer = renamed.get(key)
        if layer is None:
            state_dict[key] = value
        else:
            state_dict[_join(prefix, layer, "weight")] = weights[layer]
