"""The N:M layout record: which layers of a model are N:M, with which pattern, from which method.

It is the one description every part of maxq shares: a sparsified model reports it
([`maxq.Sparsifier.layout`][maxq.Sparsifier.layout]), a folded model carries it (``model.maxq_layout``), and every file
maxq writes stores it (folded model, compressed file, ONNX metadata) as `NMLayout.to_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .nm import validate_nm

__all__ = ["LAYOUT_ATTR", "NMLayout"]

#: attribute of a folded root module holding its `NMLayout`.
LAYOUT_ATTR = "maxq_layout"


@dataclass(frozen=True)
class NMLayout:
    """``layers`` (qualified module names, relative to the model) keep ``n`` of every ``m`` weights.

    ``transposed``: the layers among them whose weight is stored ``[in, out]`` (Hugging Face ``Conv1D``), so their
    blocks run along dim 0 of the stored tensor; recorded only when there are some (``to_dict`` leaves the key
    out otherwise, so records without it -- every older file -- mean "none").

    Also readable as a mapping (``layout["n"]``), as `to_dict` gives it.
    """

    n: int
    m: int
    layers: tuple[str, ...]
    method: str | None = None
    transposed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_nm(self.n, self.m)
        for key in ("layers", "transposed"):
            names = getattr(self, key)
            if isinstance(names, str) or not all(isinstance(name, str) for name in names):
                raise ValueError(f"layout {key} must be a list of module names, got {names!r}")
            object.__setattr__(self, key, tuple(names))
        stray = sorted(set(self.transposed) - set(self.layers))
        if stray:
            raise ValueError(f"layout: transposed layers {stray} are not among its layers")

    def input_axis(self, layer: str) -> int:
        """The axis of ``layer``'s stored weight that holds its inputs (0 for a transposed layer, else 1)."""
        return 0 if layer in self.transposed else 1

    @property
    def pattern(self) -> str:
        """``"n:m"``."""
        return f"{self.n}:{self.m}"

    def prefixed(self, prefix: str) -> NMLayout:
        """The same layout with layer names seen from a parent module (``prefix.name``)."""
        if not prefix:
            return self
        return NMLayout(
            self.n,
            self.m,
            tuple(f"{prefix}.{name}" for name in self.layers),
            self.method,
            tuple(f"{prefix}.{name}" for name in self.transposed),
        )

    def to_dict(self) -> dict[str, Any]:
        record = {"method": self.method, "n": self.n, "m": self.m, "layers": list(self.layers)}
        if self.transposed:
            record["transposed"] = list(self.transposed)
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | NMLayout, source: str = "") -> NMLayout:
        """Read `to_dict`'s form back; ``ValueError`` naming ``source`` if it is not one."""
        if isinstance(data, NMLayout):
            return data
        try:
            layers = data["layers"]
            layers = list(layers) if isinstance(layers, (list, tuple, Mapping)) else layers
            transposed = data.get("transposed") or ()
            transposed = list(transposed) if isinstance(transposed, (list, tuple)) else transposed
            return cls(int(data["n"]), int(data["m"]), layers, data.get("method"), transposed)
        except (KeyError, TypeError, ValueError) as exc:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}not a valid N:M layout record ({type(exc).__name__}: {exc})") from None

    def __getitem__(self, key: str) -> Any:
        if key not in ("method", "n", "m", "layers", "transposed"):
            raise KeyError(key)
        return list(getattr(self, key)) if key in ("layers", "transposed") else getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    @staticmethod
    def merge(layouts: Iterable[NMLayout]) -> NMLayout | None:
        """One layout for several (e.g. sub-modules sparsified separately); they must share the pattern."""
        merged: NMLayout | None = None
        for layout in layouts:
            if merged is None:
                merged = layout
                continue
            if (merged.n, merged.m) != (layout.n, layout.m):
                raise ValueError(f"model mixes N:M layouts {merged.pattern} and {layout.pattern}")
            merged = NMLayout(
                merged.n,
                merged.m,
                merged.layers + layout.layers,
                merged.method,
                merged.transposed + layout.transposed,
            )
        return merged
