"""N:M compliance check for any model or state dict (METHOD.md §6 "Verify")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .fold import nm_layout
from .layers import input_axis, is_weight_layer, select_layers
from .layout import NMLayout
from .nm import oi_view, to_blocks, validate_nm
from .parametrization import NMMask

__all__ = ["LayerCheck", "NMCheck", "check_nm", "effective_weights"]


@dataclass
class LayerCheck:
    """Compliance of one layer: ``violations`` blocks hold more than ``n`` nonzeros."""

    name: str
    shape: tuple[int, ...]
    groups: int  # blocks checked
    violations: int
    max_nonzero: int  # most nonzeros in any block: the pattern found is max_nonzero:m
    expected: bool  # the layer is supposed to be N:M (sparsified); others are only reported
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.violations == 0 and not self.note.startswith("missing")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape), "ok": self.ok}


@dataclass
class NMCheck:
    """Result of :func:`check_nm`; ``ok`` is true only if every expected layer is exactly N:M."""

    n: int
    m: int
    layers: list[LayerCheck] = field(default_factory=list)
    source: str = ""  # where the list of expected layers came from

    @property
    def expected(self) -> list[LayerCheck]:
        return [c for c in self.layers if c.expected]

    @property
    def ok(self) -> bool:
        return bool(self.expected) and all(c.ok for c in self.expected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "m": self.m,
            "ok": self.ok,
            "source": self.source,
            "layers": [c.to_dict() for c in self.layers],
        }

    def __str__(self) -> str:
        head = ("layer", "shape", "expected", "found", "groups", "violations", "note")
        rows = [head] + [_row(c, self.n, self.m) for c in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "OK" if self.ok else "NOT N:M"
        bad = sum(1 for c in self.expected if not c.ok)
        summary = f"{verdict}: {len(self.expected) - bad}/{len(self.expected)} expected layers are {self.n}:{self.m}"
        if not self.expected:
            summary = f"NOT N:M: no layer is expected to be {self.n}:{self.m} ({self.source})"
        return "\n".join(lines) + "\n" + summary + f" (expected layers from: {self.source})"


def _row(c: LayerCheck, n: int, m: int) -> tuple[str, ...]:
    """One table row. A layer that is not expected to be N:M (dense by design: first conv, classifier, ...) is
    shown as such, without counting its full blocks as violations."""
    shape = "x".join(map(str, c.shape))
    if c.expected:
        found = f"{c.max_nonzero}:{m}" if c.groups else "-"
        return (c.name, shape, f"{n}:{m}", found, str(c.groups), str(c.violations), c.note)
    found = "dense" if c.max_nonzero >= m else f"{c.max_nonzero}:{m}"
    return (c.name, shape, "dense", found, str(c.groups), "-", c.note or "dense by design (not sparsified)")


def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: weight as used in eval}`` for every Conv2d/Linear/HF Conv1D, as stored (a Conv1D weight is
    ``[in, out]``); masked layers give ``W * Mask``."""
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not is_weight_layer(module):
                continue
            if parametrize.is_parametrized(module, "weight"):
                weight = module.parametrizations.weight.original
                for p in module.parametrizations.weight:
                    weight = p.effective(weight) if isinstance(p, NMMask) else p(weight)
            else:
                weight = module.weight
            out[name] = weight.detach()
    return out


def _count(weight: Tensor, n: int, m: int) -> tuple[int, int, int]:
    """Blocks, blocks with more than ``n`` nonzeros, most nonzeros in a block, of an ``[O, I(, kh, kw)]`` weight."""
    nonzero = (to_blocks(weight, m) != 0).sum(-1)
    return nonzero.numel(), int((nonzero > n).sum()), int(nonzero.max()) if nonzero.numel() else 0


def _weights_from_mapping(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], NMLayout | None]:
    layout = None
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        layout = NMLayout.from_dict(state["layout"], "layout") if state.get("layout") else None
        state = state["state_dict"]
    unfolded = sorted(k for k in state if ".parametrizations." in k)
    if unfolded:
        raise ValueError(
            f"state dict holds unfolded maxq weights ({unfolded[0]}, ...): fold the model with maxq.fold_ "
            f"and save model.state_dict() after that"
        )
    weights = {
        key[: -len(".weight")]: t
        for key, t in state.items()
        if key.endswith(".weight") and isinstance(t, Tensor) and t.dim() in (2, 4) and t.is_floating_point()
    }
    return weights, layout


def check_nm(
    obj: nn.Module | Mapping[str, Any],
    n: int,
    m: int,
    layers: Iterable[str] | None = None,
    *,
    source: str | None = None,
    transposed: Iterable[str] | None = None,
) -> NMCheck:
    """Check that the expected layers of a model or state dict are exactly N:M (at most ``n`` nonzeros in every
    block of ``m`` consecutive input channels).

    Args:
        obj: a model (folded, or sparsified: then ``W * Mask`` is checked), a state dict, or a dict
            ``{"state_dict": ..., "layout": {"layers": [...]}}`` as written by ``maxq train``.
        n: weights kept per block (``1 <= n < m``).
        m: block size along input channels; must divide the input size.
        layers: names of the layers that must be N:M. Default: the layout the object carries (sparsified or
            folded by maxq), else the default selection rule (every eligible layer but the first conv and the
            last classifier; for a state dict: the first and last weight in key order).
        source: how to describe where ``layers`` came from in the report.
        transposed: for a state dict, the layers whose weight is stored ``[in, out]`` (HF ``Conv1D``): checked along
            dim 0. Default: the layout's record (none without one). A model's layers say it themselves.

    Returns:
        :class:`NMCheck` with a row per candidate layer (2-D/4-D weight whose input size ``m`` divides); ``.ok``
        is true only if every expected layer is N:M, and ``str()`` renders the table.

    Raises:
        ValueError: an invalid pattern.

    Example:
        >>> import torch
        >>> weight = torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]] * 2)   # two 2:4 blocks per row
        >>> check_nm({"fc.weight": weight}, 2, 4, layers=["fc"]).ok
        True
    """
    validate_nm(n, m)
    if isinstance(obj, nn.Module):
        weights = effective_weights(obj)
        layout = nm_layout(obj)
        modules = dict(obj.named_modules())
        axes = {name: input_axis(modules[name]) for name in weights}
    elif isinstance(obj, Mapping):
        weights, layout = _weights_from_mapping(obj)
        inputs_first = set(transposed if transposed is not None else layout.transposed if layout else ())
        for name in sorted(inputs_first & set(weights)):
            if weights[name].dim() != 2:
                raise ValueError(f"{name}.weight {tuple(weights[name].shape)} is listed as [in, out] but is not 2-D")
        axes = {name: 0 if name in inputs_first else 1 for name in weights}
    else:
        raise TypeError(f"check_nm takes an nn.Module or a state dict, got {type(obj).__name__}")
    weights = {name: oi_view(w, axes[name]) for name, w in weights.items()}  # every weight as [O, I(, kh, kw)]

    if layers is not None:
        expected, source = list(layers), source or "the layers argument"
    elif layout is not None:
        if (layout.n, layout.m) != (n, m):
            raise ValueError(f"the object was sparsified {layout.pattern}, not {n}:{m}")
        expected, source = list(layout.layers), "the model's maxq layout"
    elif isinstance(obj, nn.Module):
        expected = [c.name for c in select_layers(obj, m) if c.selected]
        source = "the default selection rule"
    else:
        names = list(weights)
        conv = [k for k in names if weights[k].dim() == 4]
        skip = {conv[0] if conv else None, names[-1] if names else None}
        expected = [k for k in names if k not in skip and weights[k].shape[1] % m == 0]
        source = "the default rule on key order (first conv and last layer dense)"

    result = NMCheck(n, m, source=source)
    expected_set = set(expected)
    for name, weight in weights.items():
        inputs = weight.shape[1]
        shape = tuple(oi_view(weight, axes[name]).shape)  # as stored (back from the [O, I] view)
        if inputs % m:
            if name in expected_set:
                result.layers.append(
                    LayerCheck(name, shape, 0, 0, 0, True, f"missing: input size {inputs} not divisible by {m}")
                )
            continue
        groups, violations, most = _count(weight, n, m)
        note = "[in, out] weight: blocks along dim 0" if axes[name] == 0 else ""
        result.layers.append(LayerCheck(name, shape, groups, violations, most, name in expected_set, note))
    for name in expected:
        if name not in weights:
            result.layers.append(LayerCheck(name, (), 0, 0, 0, True, "missing: no such layer"))
    return result
