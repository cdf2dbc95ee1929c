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
    """Compliance of one layer: ``violations`` blocks hold more than ``n`` nonzeros.

    A layer that is not ``expected`` to be N:M (dense by design, or found dense in a file without a record) has
    nothing to violate: its ``ok`` is true and its row shows no violation count.
    """

    name: str
    shape: tuple[int, ...]
    groups: int  # blocks checked
    violations: int  # blocks with more than n nonzeros
    max_nonzero: int  # most nonzeros in any block: the pattern found is max_nonzero:m
    expected: bool  # the layer is supposed to be N:M (sparsified); others are only reported
    note: str = ""
    zero_blocks: int = 0  # blocks with no nonzero at all (a zero row, a padding embedding, ...)

    @property
    def missing(self) -> bool:
        return self.note.startswith("missing")

    @property
    def ok(self) -> bool:
        if not self.expected:
            return True
        return self.violations == 0 and not self.missing

    def cells(self, n: int, m: int) -> dict[str, Any]:
        """The layer's row, as both the table and the JSON show it (one computation for both).

        Keys: ``name``, ``shape``, ``expected`` (bool), ``pattern`` (``"N:M"`` or ``"dense"``: what the layer must
        be), ``found`` (``"k:M"`` with ``k`` the most nonzeros in a block, or ``"dense"``), ``groups``,
        ``violations`` (``None`` for a layer not expected to be N:M), ``max_nonzero``, ``zero_blocks``, ``ok``,
        ``note``.
        """
        if self.expected:
            found = f"{self.max_nonzero}:{m}" if self.groups else "-"
            pattern, violations = f"{n}:{m}", self.violations
        else:
            found = "dense" if self.max_nonzero >= m else f"{self.max_nonzero}:{m}"
            pattern, violations = "dense", None
        return {
            "name": self.name,
            "shape": list(self.shape),
            "expected": self.expected,
            "pattern": pattern,
            "found": found,
            "groups": self.groups,
            "violations": violations,
            "max_nonzero": self.max_nonzero,
            "zero_blocks": self.zero_blocks,
            "ok": self.ok,
            "note": self.note,
        }


@dataclass
class NMCheck:
    """Result of [`check_nm`][maxq.check_nm]; ``ok`` is true only if every expected layer is exactly N:M."""

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
        """The check as JSON-ready data; each layer is its [`LayerCheck.cells`][maxq.LayerCheck.cells], the table's
        row."""
        return {
            "n": self.n,
            "m": self.m,
            "ok": self.ok,
            "source": self.source,
            "layers": [c.cells(self.n, self.m) for c in self.layers],
        }

    def __str__(self) -> str:
        head = ("layer", "shape", "expected", "found", "groups", "violations", "note")
        rows = [head] + [_row(c.cells(self.n, self.m)) for c in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "OK" if self.ok else "NOT N:M"
        bad = sum(1 for c in self.expected if not c.ok)
        summary = f"{verdict}: {len(self.expected) - bad}/{len(self.expected)} expected layers are {self.n}:{self.m}"
        if not self.expected:
            summary = f"NOT N:M: no layer is expected to be {self.n}:{self.m} ({self.source})"
        return "\n".join(lines) + "\n" + summary + f" (expected layers from: {self.source})"


def _row(cells: dict[str, Any]) -> tuple[str, ...]:
    """One table row from [`LayerCheck.cells`][maxq.LayerCheck.cells] (a layer not expected to be N:M shows ``-``
    violations)."""
    shape = "x".join(map(str, cells["shape"]))
    violations = "-" if cells["violations"] is None else str(cells["violations"])
    return (cells["name"], shape, cells["pattern"], cells["found"], str(cells["groups"]), violations, cells["note"])


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


def _count(weight: Tensor, n: int, m: int) -> tuple[int, int, int, int]:
    """Blocks, blocks with more than ``n`` nonzeros, most nonzeros in a block, and blocks without any nonzero, of
    an ``[O, I(, kh, kw)]`` weight."""
    nonzero = (to_blocks(weight, m) != 0).sum(-1)
    most = int(nonzero.max()) if nonzero.numel() else 0
    return nonzero.numel(), int((nonzero > n).sum()), most, int((nonzero == 0).sum())


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
        [`NMCheck`][maxq.NMCheck] with a row per candidate layer (2-D/4-D weight whose input size ``m`` divides);
        ``.ok`` is true only if every expected layer is N:M, and ``str()`` renders the table.

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

    dense_notes: dict[str, str] = {}  # why a layer is not expected to be N:M, by name
    if layers is not None:
        expected, source = list(layers), source or "the layers argument"
        why = "dense by design (not in the list of N:M layers)"
    elif layout is not None:
        if (layout.n, layout.m) != (n, m):
            raise ValueError(f"the object was sparsified {layout.pattern}, not {n}:{m}")
        expected, source = list(layout.layers), "the model's maxq layout"
        why = "dense by design (not sparsified)"
    elif isinstance(obj, nn.Module):
        choices = select_layers(obj, m)
        expected = [c.name for c in choices if c.selected]
        dense_notes = {c.name: f"dense by the default rule: {c.reason}" for c in choices if not c.selected}
        source, why = "the default selection rule", "dense by the default rule"
    else:
        names = list(weights)
        conv = [k for k in names if weights[k].dim() == 4]
        skip = {conv[0] if conv else None, names[-1] if names else None}
        expected = [k for k in names if k not in skip and weights[k].shape[1] % m == 0]
        source = "the default rule on key order (first conv and last layer dense)"
        why = "dense by the default rule (first conv, last layer)"

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
        groups, violations, most, zero = _count(weight, n, m)
        notes = ["[in, out] weight: blocks along dim 0"] if axes[name] == 0 else []
        if name not in expected_set:
            notes.insert(0, dense_notes.get(name, why))
        result.layers.append(
            LayerCheck(name, shape, groups, violations, most, name in expected_set, "; ".join(notes), zero)
        )
    for name in expected:
        if name not in weights:
            result.layers.append(LayerCheck(name, (), 0, 0, 0, True, "missing: no such layer"))
    return result
