"""Method configurations: small validated dataclasses, one per method (SPEC §5).

``dense`` needs no configuration (it is the model without :func:`maxq.sparsify_`). ``CONFIGS`` is the one place a
method name becomes a config class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .masks import BLOCK_ORDERS
from .nm import validate_nm
from .schedules import SCHEDULES

__all__ = ["CONFIGS", "MaxQConfig", "NMConfig", "OneShotConfig", "SRSTEConfig", "make_config"]


def _check_number(name: str, value: Any, *, low: float | None = None, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite {'int' if integer else 'number'}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


@dataclass(frozen=True)
class NMConfig:
    """Settings shared by every N:M method.

    Attributes:
        n, m: keep ``n`` of every ``m`` weights along input channels (``1 <= n < m``).
        strict: raise instead of skipping a layer the selection asked for but that cannot be N:M (not divisible,
            grouped conv, ...).
        skip_first: keep the network's first conv dense (default layer selection only).
        skip_last: keep the last classifier (last Conv2d/Linear) dense (default layer selection only).
        update_every: recompute masks every this many training steps (forward passes of the root model in
            training mode); 1 = every step, the paper's behaviour. A change of the ramp's dense fraction (in
            ``set_progress``) recomputes at the next step regardless. Larger values save time but can cost
            accuracy at high sparsity (8 cost ~3.5 top-1 points at 1:16 in docs/RESULTS.md).
    """

    method: ClassVar[str] = "nm"

    n: int = 2
    m: int = 4
    strict: bool = False
    skip_first: bool = True
    skip_last: bool = True
    update_every: int = 1

    def __post_init__(self) -> None:
        validate_nm(self.n, self.m)
        _check_number("update_every", self.update_every, low=1, integer=True)

    # Behaviour switches the stateful layer reads; methods override them.
    @property
    def frozen(self) -> bool:
        """Mask computed once from the starting weights and never recomputed (one-shot)."""
        return False

    @property
    def straight_through(self) -> bool:
        """Gradient w.r.t. ``W`` is the gradient w.r.t. ``W * Mask`` (pruned weights keep learning)."""
        return True

    @property
    def soft(self) -> bool:
        return False

    @property
    def decay(self) -> float:
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        if "ramp" in d:
            d["ramp"] = list(d["ramp"])
        return d


@dataclass(frozen=True)
class OneShotConfig(NMConfig):
    """ASP-style: hard N:M mask from the starting weights, frozen; pruned weights stay zero."""

    method: ClassVar[str] = "oneshot"

    @property
    def frozen(self) -> bool:
        return True

    @property
    def straight_through(self) -> bool:
        return False


@dataclass(frozen=True)
class SRSTEConfig(NMConfig):
    """SR-STE (Zhou et al. 2021): hard N:M mask recomputed every step, STE, decay on pruned weights.

    Attributes:
        decay_lambda: SR-STE decay ``lambda``: ``grad += lambda * (1 - clamp(Mask, 0, 1)) * W``.
    """

    method: ClassVar[str] = "srste"

    decay_lambda: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("decay_lambda", self.decay_lambda, low=0.0)

    @property
    def decay(self) -> float:
        return self.decay_lambda


@dataclass(frozen=True)
class MaxQConfig(SRSTEConfig):
    """MaxQ (Xiang et al., CVPR 2024): ``Mask = B_t * (1 + Q_f + Q_k)`` with incremental sparsity.

    Attributes:
        tau: query temperature, absolute in units of ``|W|`` (paper default 0.01).
        queries: use the soft axis queries; ``False`` = hard ``B_t`` only (ablation).
        schedule: dense-fraction schedule: ``linear`` (paper), ``cubic``, ``cos``, ``exp``, ``none``.
        ramp: ``(start, end)`` in epochs: ``p`` falls from 1 at ``start`` to 0 at ``end`` (paper: 0 to 30 of 120).
        per_step: smooth ramp updated every step; default is the paper's once-per-epoch staircase.
        order: which blocks stay dense during the ramp: ``smallest`` L1 (paper), ``largest``, ``random``.
        exp_rate: ``b`` of the ``exp`` schedule, per epoch.
        seed: seed of the ``random`` block order (identical on every DDP rank).
    """

    method: ClassVar[str] = "maxq"

    tau: float = 0.01
    queries: bool = True
    schedule: str = "linear"
    ramp: tuple[float, float] = field(default=(0.0, 30.0))
    per_step: bool = False
    order: str = "smallest"
    exp_rate: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("tau", self.tau)
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0 (it divides |W| - t), got {self.tau}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {sorted(SCHEDULES)}")
        if self.order not in BLOCK_ORDERS:
            raise ValueError(f"unknown block order {self.order!r}; choose one of {list(BLOCK_ORDERS)}")
        try:
            start, end = self.ramp
        except (TypeError, ValueError):
            raise ValueError(f"ramp must be (start, end) in epochs, got {self.ramp!r}") from None
        _check_number("ramp start", start, low=0.0)
        _check_number("ramp end", end, low=0.0)
        if end < start:
            raise ValueError(f"ramp end ({end}) must be >= ramp start ({start}); both are epochs")
        object.__setattr__(self, "ramp", (float(start), float(end)))
        _check_number("exp_rate", self.exp_rate)
        if self.exp_rate <= 0:
            raise ValueError(f"exp_rate must be > 0, got {self.exp_rate}")
        _check_number("seed", self.seed, integer=True)

    @property
    def soft(self) -> bool:
        return self.queries


#: method name -> config class: the one lookup from a string to a method.
CONFIGS: dict[str, type[NMConfig]] = {c.method: c for c in (MaxQConfig, SRSTEConfig, OneShotConfig)}


def make_config(method: str, **options: Any) -> NMConfig:
    """Build the config of ``method`` from keyword options; unknown methods or options raise ``ValueError``."""
    try:
        cls = CONFIGS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(CONFIGS)} (or 'dense')") from None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; it takes {sorted(names)}")
    return cls(**options)
