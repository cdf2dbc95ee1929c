"""Training configuration of ``maxq train``: one validated dataclass, filled from a YAML recipe and CLI flags.

Precedence: dataclass defaults < YAML file (``--config``) < command-line flags. The resolved configuration is
written to the run folder as ``config.yaml`` and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.config import NMConfig, config_options, make_config
from ..core.nm import parse_nm

__all__ = ["TrainConfig", "METHODS", "load_yaml", "RESUMABLE_OVERRIDES"]

#: every method ``maxq train`` runs (``dense`` has no sparsifier).
METHODS = ("maxq", "srste", "oneshot", "dense")

#: ``--amp-dtype`` values and the autocast dtype each means.
AMP_DTYPES = {"float16": "float16", "bfloat16": "bfloat16"}

#: options that may differ between a checkpoint and the command resuming it.
RESUMABLE_OVERRIDES = frozenset(
    {"epochs", "out", "resume", "device", "workers", "threads", "progress", "config", "compile", "channels_last"}
)


@dataclass
class TrainConfig:
    """Everything a training run depends on. Units: epochs unless stated otherwise."""

    # what to train
    method: str = "maxq"
    nm: str = "2:4"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "cnn_small"
    image_size: int = 224  # imagefolder crops and ViT-style models
    val_split: float = 0.0  # share of the training set held out for validation (model selection)
    subset: int | None = None  # train on this many samples only
    # optimisation
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_1d: bool = False  # no weight decay on 1-D parameters (biases, norms)
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    amp: bool | None = None  # default: on for CUDA
    amp_dtype: str = "float16"  # autocast dtype with --amp: float16 (with loss scaling) or bfloat16
    channels_last: bool = False  # model and inputs in channels_last memory format
    compile: bool = False  # torch.compile the training forward (masks are updated outside it)
    # sparsity (paper defaults, docs/METHOD.md; the ramp defaults to the paper's share, 25% of training)
    ramp: tuple[float, float] | None = None
    schedule: str = "linear"
    per_step: bool = False
    tau: float = 0.01
    queries: bool = True
    order: str = "smallest"
    decay_lambda: float = 2e-4
    update_every: int = 1
    # run
    seed: int = 0
    out: str = "runs/run"
    resume: bool = False
    init: str | None = None  # start from this checkpoint's weights (dense or folded)
    device: str = "auto"
    workers: int = 2
    threads: int | None = None
    progress: bool = True
    config: str | None = None  # the YAML file the run was configured from (informational)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. a study's variant name)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        parse_nm(self.nm)
        for name in ("epochs", "batch_size", "update_every", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "workers" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in (
            "lr",
            "momentum",
            "weight_decay",
            "label_smoothing",
            "warmup_epochs",
            "decay_lambda",
            "tau",
            "val_split",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.val_split < 1:
            raise ValueError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.ramp is not None:
            if len(self.ramp) != 2:
                raise ValueError(f"--ramp takes START END (epochs), got {self.ramp!r}")
            self.ramp = (float(self.ramp[0]), float(self.ramp[1]))
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"--amp-dtype must be one of {sorted(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.sparsity_config()  # validates ramp, schedule, tau, order, ... with the library's own messages

    @property
    def n_m(self) -> tuple[int, int]:
        return parse_nm(self.nm)

    @property
    def resolved_ramp(self) -> tuple[float, float]:
        """The ramp in epochs: as given, else the paper's share (first 25% of training)."""
        return self.ramp if self.ramp is not None else (0.0, round(0.25 * self.epochs, 3))

    def sparsity_config(self) -> NMConfig | None:
        """The library config for ``method`` (``None`` for dense): every option the method's config class takes,
        from this run's settings (the config class, not this function, knows which options a method has)."""
        if self.method == "dense":
            return None
        n, m = self.n_m
        settings = {**self.to_dict(), "n": n, "m": m, "ramp": self.resolved_ramp}
        return make_config(self.method, **{k: settings[k] for k in config_options(self.method) if k in settings})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ramp"] = list(self.ramp) if self.ramp is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe: a YAML mapping of :class:`TrainConfig` option names (dashes or underscores)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
