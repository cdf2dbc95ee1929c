"""What a calibration does: one small validated dataclass, and the one place a method name is checked."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..core.config import NMConfig
from ..core.nm import validate_nm

__all__ = ["CALIBRATION_METHODS", "CalibrationConfig", "calibration_for"]

#: the saliencies [`maxq.calibrate_`][maxq.calibrate_] knows: ``magnitude`` (|W|, no data), ``wanda`` (|W| x the
#: input feature's activation norm; Sun et al. 2023) and ``sparsegpt`` (OBS pruning with weight reconstruction from
#: the calibration Hessian; Frantar & Alistarh 2023).
CALIBRATION_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of one calibrated one-shot N:M pruning ([`maxq.calibrate_`][maxq.calibrate_]).

    Attributes:
        method: ``sparsegpt`` (prune and reconstruct the kept weights from the calibration Hessian), ``wanda``
            (prune by ``|W| x ||X_j||``, kept weights unchanged) or ``magnitude`` (prune by ``|W|``, no data).
        n: weights kept per block (``1 <= n < m``).
        m: block size, along each layer's inputs (the same blocks as [`maxq.sparsify_`][maxq.sparsify_]).
        batches: how many batches to draw from the calibration data (held in memory, the same ones for every
            layer); ``None``: every batch the data yields.
        blocksize: SparseGPT: columns (inputs) per lazy-update block; a multiple of ``m``.
        damp: SparseGPT: dampening added to the Hessian's diagonal, as a share of its mean diagonal (0.01 = 1 %).
        strict: raise instead of skipping a layer the selection asked for but that cannot be N:M.
        skip_first: keep the network's first conv dense (default layer selection only).
        skip_last: keep the last classifier (last Conv2d/Linear) dense (default layer selection only).

    Raises:
        ValueError: an unknown method or an invalid value (the message says what to pass).
    """

    method: str = "sparsegpt"
    n: int = 2
    m: int = 4
    batches: int | None = None
    blocksize: int = 128
    damp: float = 0.01
    strict: bool = False
    skip_first: bool = True
    skip_last: bool = True

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {list(CALIBRATION_METHODS)}")
        validate_nm(self.n, self.m)
        if self.batches is not None and (
            isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1
        ):
            raise ValueError(f"batches must be a positive int (or None for every batch), got {self.batches!r}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive int (columns per block), got {self.blocksize!r}")
        if self.blocksize % self.m:
            raise ValueError(
                f"blocksize {self.blocksize} must be a multiple of m={self.m}, so that no N:M block straddles two "
                f"column blocks; e.g. blocksize={max(self.m, self.blocksize // self.m * self.m)}"
            )
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp):
            raise ValueError(f"damp must be a finite number (share of the mean Hessian diagonal), got {self.damp!r}")
        if self.damp <= 0:
            raise ValueError(f"damp must be > 0 (e.g. 0.01): it keeps the Hessian invertible, got {self.damp!r}")
        for name in ("strict", "skip_first", "skip_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration inputs (all but ``magnitude``)."""
        return self.method != "magnitude"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def calibration_for(config: NMConfig, calibration: str | CalibrationConfig) -> CalibrationConfig:
    """The calibration that prepares a model for ``config``'s training: its pattern and layer selection.

    Args:
        config: the N:M method that trains next (its ``n``, ``m``, ``strict``, ``skip_first``, ``skip_last``).
        calibration: a method name (``wanda``, ``sparsegpt``, ``magnitude``) or a full
            [`CalibrationConfig`][maxq.CalibrationConfig] (which must agree with ``config``).

    Raises:
        ValueError: an unknown method, or a config whose pattern or selection differs from ``config``'s.
    """
    same = {"n": config.n, "m": config.m, "strict": config.strict, "skip_first": config.skip_first,
            "skip_last": config.skip_last}  # fmt: skip
    if isinstance(calibration, str):
        return CalibrationConfig(method=calibration, **same)
    if not isinstance(calibration, CalibrationConfig):
        raise ValueError(
            f"calibration must be a method name {list(CALIBRATION_METHODS)} or a maxq.CalibrationConfig, got "
            f"{type(calibration).__name__}"
        )
    differ = {k: (getattr(calibration, k), v) for k, v in same.items() if getattr(calibration, k) != v}
    if differ:
        details = ", ".join(f"{k}: calibration {a!r} vs training {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"the calibration and the training config must prune the same layers to the same pattern ({details}); "
            "pass the method name alone to take them from the training config"
        )
    return calibration
