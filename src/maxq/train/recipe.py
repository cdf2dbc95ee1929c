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

from ..calibrate.config import CALIBRATION_METHODS
from ..core.config import NMConfig, config_options, make_config
from ..core.nm import parse_nm

__all__ = ["TrainConfig", "METHODS", "load_yaml", "RESUMABLE_OVERRIDES"]

#: every method ``maxq train`` runs (``dense`` has no sparsifier).
METHODS = ("maxq", "srste", "oneshot", "dense")

#: ``--amp-dtype`` values and the autocast dtype each means.
AMP_DTYPES = {"float16": "float16", "bfloat16": "bfloat16"}

#: options that may differ between a checkpoint and the command resuming it.
#: ``epochs`` may only grow, and only with ``extend`` (the cosine schedule and the default ramp depend on it).
RESUMABLE_OVERRIDES = frozenset(
    {
        "epochs",
        "extend",
        "out",
        "resume",
        "data_dir",
        "device",
        "workers",
        "threads",
        "progress",
        "config",
        "compile",
        "channels_last",
    }
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
    soft_warmup: str = "none"  # MaxQ: the soft factor on a trained model (our addition, METHOD.md §8)
    decay_lambda: float = 2e-4
    update_every: int = 1
    # calibrated one-shot start (with --init): prune the trained model by wanda/sparsegpt before training
    calibrate: str | None = None
    calibration_batches: int = 16  # training batches (of --batch-size) drawn for calibration
    # run
    seed: int = 0
    out: str = "runs/run"
    resume: bool = False
    extend: bool = False  # with resume: train a run past the --epochs it was started with (see README)
    init: str | None = None  # start from this checkpoint's weights (dense or folded)
    finetune: bool = False  # a fine-tuning recipe (configs/finetune.yaml): refused without init, it would start cold
    device: str = "auto"
    fsdp: bool = False  # shard the model with FSDP2 (fully_shard) instead of DDP; checkpoints through DCP
    workers: int = 2
    threads: int | None = None
    progress: bool = True
    config: str | None = None  # the YAML file the run was configured from (informational)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. a study's variant name)

    def __post_init__(self) -> None:
        """Check every value (flags and YAML alike) before anything is run or written; messages name the flag."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if not isinstance(self.nm, str):
            raise ValueError(f"--nm must be a pattern like '2:4' (keep N of every M), got {self.nm!r}")
        parse_nm(self.nm)
        for name in ("dataset", "model", "schedule", "order", "soft_warmup", "device", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"--{_flag(name)} must be a non-empty string, got {value!r}")
        for name in ("data_dir", "init", "config"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"--{_flag(name)} must be a path, got {value!r}")
        for name in (
            "nesterov",
            "no_decay_1d",
            "per_step",
            "queries",
            "resume",
            "extend",
            "progress",
            "compile",
            "channels_last",
            "finetune",
            "fsdp",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"amp must be true, false or left unset (on with CUDA), got {self.amp!r}")
        for name in ("epochs", "batch_size", "update_every", "image_size", "calibration_batches"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("workers", self.workers, low=0)
        _check_int("seed", self.seed, low=0)
        for name in ("threads", "subset"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        # Numbers and their ranges; the message gives the range, the same way for every value outside it.
        _check_float("lr", self.lr, low=0.0, low_open=True, hint="the peak learning rate, e.g. 0.1")
        _check_float("momentum", self.momentum, low=0.0, high=1.0, hint="SGD momentum, e.g. 0.9")
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("label_smoothing", self.label_smoothing, low=0.0, high=1.0, hint="0.1 is usual; 0 turns it off")
        _check_float("warmup_epochs", self.warmup_epochs, low=0.0)
        _check_float("decay_lambda", self.decay_lambda, low=0.0)
        _check_float("tau", self.tau, low=0.0, low_open=True, hint="the query temperature, default 0.01")
        _check_float("val_split", self.val_split, low=0.0, high=1.0, hint="a share of the training set, e.g. 0.1")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} is longer than the run (--epochs {self.epochs})")
        if self.ramp is not None:
            if isinstance(self.ramp, (str, bytes)) or not hasattr(self.ramp, "__len__") or len(self.ramp) != 2:
                raise ValueError(f"--ramp takes START END (epochs), got {self.ramp!r}")
            for bound in self.ramp:
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                    raise ValueError(f"--ramp takes two numbers START END (epochs), got {self.ramp!r}")
            self.ramp = (float(self.ramp[0]), float(self.ramp[1]))
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"--amp-dtype must be one of {sorted(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {self.extra!r}")
        if self.calibrate is not None:
            if self.calibrate not in CALIBRATION_METHODS:
                raise ValueError(f"--calibrate must be one of {list(CALIBRATION_METHODS)}, got {self.calibrate!r}")
            if self.method == "dense":
                raise ValueError("--calibrate prunes the model N:M before training: it needs an N:M --method")
            if self.init is None:
                raise ValueError(
                    "--calibrate prunes a trained model from its activations: pass its weights with --init RUN"
                )
        if self.finetune and not self.init and not self.resume:
            raise ValueError(
                f"{self.config or 'this recipe'} fine-tunes a trained model (finetune: true), and no --init says "
                "which: pass --init RUN/checkpoint.pt (a run folder, checkpoint.pt, model_folded.pt or a state dict "
                "of the same --model). To train from scratch, use another recipe (its learning rate and length are "
                "set for a trained model) or set finetune: false"
            )
        if self.extend and not self.resume:
            raise ValueError("--extend continues a run past its --epochs; it needs --resume (and a larger --epochs)")
        self.sparsity_config()  # validates ramp, schedule, tau, order, ... with the library's own messages

    @property
    def n_m(self) -> tuple[int, int]:
        return parse_nm(self.nm)

    @property
    def resolved_ramp(self) -> tuple[float, float]:
        """The ramp in epochs: as given, else the paper's share (first 25% of training)."""
        return self.ramp if self.ramp is not None else (0.0, round(0.25 * self.epochs, 3))

    @property
    def method_ramp(self) -> tuple[float, float] | None:
        """The ramp this run's method follows, in epochs (``None`` for methods without a schedule)."""
        return self.resolved_ramp if self.method != "dense" and "ramp" in config_options(self.method) else None

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


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"--{_flag(name)} must be {kind}, got {value!r}")


def _check_float(
    name: str,
    value: Any,
    *,
    low: float,
    low_open: bool = False,
    high: float | None = None,
    hint: str = "",
) -> None:
    """``value`` is a finite number in ``[low, high)`` (``(low, high)`` with ``low_open``); else one message that
    states the range, whichever side was crossed."""
    left = "(" if low_open else "["
    wanted = f"in {left}{low:g}, {high:g})" if high is not None else f"{'>' if low_open else '>='} {low:g}"
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (high is None or value < high)
    )
    if not ok:
        raise ValueError(f"--{_flag(name)} must be a number {wanted}, got {value!r}" + (f" ({hint})" if hint else ""))


#: options read as floats; YAML 1.1 reads ``1e-3`` (no dot) as text, so a recipe's numeric strings are converted.
_FLOAT_OPTIONS = frozenset(
    {"lr", "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "decay_lambda", "tau", "val_split"}
)


def _sexagesimal(value: int) -> str | None:
    """The ``N:M`` that YAML 1.1 read as the base-60 number ``value`` (``2:4`` -> 124, ``1:16`` -> 76), if any."""
    if value < 60:
        return None
    high, low = divmod(value, 60)
    try:
        parse_nm(f"{high}:{low}")
    except ValueError:
        return None
    return f"{high}:{low}"


def _nm_hint(value: int) -> str:
    """What to say about a number where the N:M pattern should be."""
    pattern = _sexagesimal(value)
    if pattern is not None:
        return f'write nm: "{pattern}" (quoted): YAML reads {pattern} unquoted as the number {value}'
    return f'nm must be a quoted pattern like nm: "2:4" (keep N of every M), got the number {value}'


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe: a YAML mapping of `TrainConfig` option names (dashes or underscores)."""
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
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    if isinstance(options.get("nm"), int) and not isinstance(options["nm"], bool):
        raise ValueError(f"config file {path}: {_nm_hint(options['nm'])}")
    for key in _FLOAT_OPTIONS & set(options):
        if isinstance(options[key], str):
            try:
                options[key] = float(options[key])
            except ValueError:
                raise ValueError(f"config file {path}: {key} must be a number, got {options[key]!r}") from None
    return options
