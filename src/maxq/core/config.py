"""Method configurations: small validated dataclasses, one per method, each the one owner of its method's
behaviour (which mask, which schedule, which gradient).

``dense`` needs no configuration (it is the model without [`maxq.sparsify_`][maxq.sparsify_]). ``CONFIGS`` is the one
place a method name becomes a config class. The stateful layer ([`maxq.Sparsifier`][maxq.Sparsifier]) asks the config --
never the method's name -- what to do: ``frozen``, ``straight_through``, ``soft``, ``decay``,
[`NMConfig.dense_fraction`][maxq.NMConfig.dense_fraction] and [`NMConfig.block_priority`][maxq.NMConfig.block_priority],
[`NMConfig.soft_strength`][maxq.NMConfig.soft_strength], ``normalize_soft``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .masks import BLOCK_ORDERS, SOFT_WARMUPS
from .nm import validate_nm
from .schedules import SCHEDULES, dense_fraction

__all__ = ["CONFIGS", "MaxQConfig", "NMConfig", "OneShotConfig", "SRSTEConfig", "config_options", "make_config"]


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
        n: weights kept per block (``1 <= n < m``).
        m: block size, along input channels (2:4 is 50 % sparse, 1:16 is 93.75 %).
        strict: raise instead of skipping a layer the selection asked for but that cannot be N:M (not divisible,
            grouped conv, ...).
        skip_first: keep the network's first conv dense (default layer selection only).
        skip_last: keep the last classifier (last Conv2d/Linear) dense (default layer selection only).
        update_every: recompute masks every this many optimizer steps (``Sparsifier.step()`` calls); 1 = every
            step, the paper's behaviour. A change of the ramp's dense fraction (``set_progress``) recomputes at
            once regardless. Larger values save time but can cost accuracy at high sparsity (8 cost ~3.5 top-1
            points at 1:16 in docs/RESULTS.md).

    Configs are frozen dataclasses validated on construction; the subclass chooses the method.

    Raises:
        ValueError: an invalid value (a pattern with ``n >= m``, ``update_every < 1``, ...).
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

    # -- the method's behaviour (what the stateful layer asks; methods override) ------------------------------
    #: the mask is computed once from the starting weights and never recomputed (one-shot)
    frozen: ClassVar[bool] = False
    #: the gradient w.r.t. ``W`` is the gradient w.r.t. ``W * Mask`` (pruned weights keep learning)
    straight_through: ClassVar[bool] = True

    @property
    def soft(self) -> bool:
        """The mask includes the axis queries ``1 + Q_f + Q_k``."""
        return False

    @property
    def decay(self) -> float:
        """SR-STE decay ``lambda`` on pruned weights (0: none)."""
        return 0.0

    @property
    def tau(self) -> float:
        """Query temperature (used only when [`soft`][maxq.NMConfig.soft])."""
        return 0.01

    @property
    def order(self) -> str:
        """Which blocks stay dense while [`dense_fraction`][maxq.NMConfig.dense_fraction] > 0."""
        return "smallest"

    def dense_fraction(self, progress: float) -> float:
        """Share of blocks kept dense at training progress ``progress`` (epochs): 0 without a schedule."""
        return 0.0

    @property
    def exact_n(self) -> bool:
        """Every block keeps exactly ``n`` weights at every step (no block is ever kept dense), so a hard mask can be
        held as the positions of its kept weights, in fewer bits than one per weight where ``n * ceil(log2 m) < m``
        (1:4, 1:8, 2:8, 1:16; the memory section of the library guide)."""
        return True

    def soft_strength(self, dense_fraction: float) -> float:
        """``a`` in ``Mask = a * soft + (1 - a) * B``: how much of the soft factor acts at dense fraction ``p``
        (1: all of it, the paper)."""
        return 1.0

    @property
    def normalize_soft(self) -> bool:
        """Rescale each layer's kept mask values to a mean of 1 after every update."""
        return False

    def block_priority(self, layer_index: int, blocks: int) -> torch.Tensor | None:
        """Per-block scores for the ``random`` block order of layer number ``layer_index`` (else ``None``)."""
        return None

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
    frozen: ClassVar[bool] = True
    straight_through: ClassVar[bool] = False


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
        soft_warmup: how the soft factor ``1 + Q_f + Q_k`` meets a model that is already trained (our addition,
            not the paper's; METHOD.md §8): ``none`` (paper), ``ramp`` (phased in with the ramp,
            ``Mask = a * B(1 + Q_f + Q_k) + (1 - a) * B`` with ``a = 1 - p``, so the first forward of a fully dense
            ramp is the model itself), ``normalize`` (each layer's kept mask values rescaled to a mean of 1).
        keep_soft_mask: hold each layer's soft mask as a weight-sized float tensor between updates (as maxq 0.2
            did) instead of rebuilding ``1 + Q_f + Q_k`` from its bit-plane state in every forward and backward:
            the same results bit for bit, 1x the sparsified weight bytes more memory, less CPU time per step (the
            sigmoids once per update instead of twice per step). For CPU training where memory is not the limit.
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
    soft_warmup: str = "none"
    keep_soft_mask: bool = False

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
        if not isinstance(self.keep_soft_mask, bool):
            raise ValueError(f"keep_soft_mask must be True or False, got {self.keep_soft_mask!r}")
        if self.soft_warmup not in SOFT_WARMUPS:
            raise ValueError(f"unknown soft_warmup {self.soft_warmup!r}; choose one of {list(SOFT_WARMUPS)}")

    @property
    def soft(self) -> bool:
        return self.queries

    @property
    def exact_n(self) -> bool:
        return False  # the ramp keeps blocks dense

    def soft_strength(self, dense_fraction: float) -> float:
        return 1.0 - dense_fraction if self.soft_warmup == "ramp" else 1.0

    @property
    def normalize_soft(self) -> bool:
        return self.soft_warmup == "normalize"

    def dense_fraction(self, progress: float) -> float:
        start, end = self.ramp
        return dense_fraction(self.schedule, progress, start, end, per_step=self.per_step, b=self.exp_rate)

    def block_priority(self, layer_index: int, blocks: int) -> torch.Tensor | None:
        if self.order != "random":
            return None
        # Seeded per layer, identical on every DDP rank and every rerun.
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer_index)
        return torch.randperm(blocks, generator=gen).to(torch.float32)


#: method name -> config class: the one lookup from a string to a method.
CONFIGS: dict[str, type[NMConfig]] = {c.method: c for c in (MaxQConfig, SRSTEConfig, OneShotConfig)}


def config_options(method: str) -> list[str]:
    """The option names ``method``'s config class takes (``ValueError`` for an unknown method)."""
    try:
        return [f.name for f in dataclasses.fields(CONFIGS[method])]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(CONFIGS)} (or 'dense')") from None


def make_config(method: str, **options: Any) -> NMConfig:
    """Build the config of ``method`` from keyword options.

    Args:
        method: ``maxq``, ``srste`` or ``oneshot`` (the keys of [`CONFIGS`][maxq.CONFIGS]).
        **options: fields of that config class (``n``, ``m``, ``ramp``, ...).

    Raises:
        ValueError: an unknown method or option, or an invalid value.

    Example:
        >>> make_config("srste", n=1, m=16).decay_lambda
        0.0002
    """
    try:
        cls = CONFIGS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(CONFIGS)} (or 'dense')") from None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; it takes {sorted(names)}")
    return cls(**options)
