"""The stateful layer of calibration: walk a model's layers in the order its forward reaches them, collect each
one's input statistics from the calibration batches, prune it, move on ([`maxq.calibrate_`][maxq.calibrate_]).

Sequential by construction: a layer's statistics come from a forward of the model whose earlier layers are
already pruned (and, for SparseGPT, reconstructed), so every layer is calibrated on the inputs it will see. The
order is the order of first calls in one traced forward. Layers that read the very same input tensor with the same
column layout (a transformer's query/key/value projections) form one group: one set of statistics, one Hessian,
pruned together. Each group costs one forward over the calibration batches, cut short right after the group's
last call (nothing after it is computed), so memory holds one group's statistics at a time and no activations
are cached between groups.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from ..core.layers import FilterFn, is_hf_conv1d, select_layers
from ..core.sparsifier import sparsifier_of
from .columns import compute_dtype, input_columns, weight_columns, write_columns_
from .config import CalibrationConfig
from .magnitude import magnitude_prune
from .sparsegpt import sparsegpt_prune
from .stats import InputStats
from .wanda import wanda_prune

__all__ = ["CalibrationReport", "LayerCalibration", "calibrate_", "default_forward"]

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], Any]

#: calibration data with a known length above this needs an explicit ``batches`` (it is held in memory).
_MAX_IMPLICIT_BATCHES = 1024


@dataclass
class LayerCalibration:
    """One row of a [`CalibrationReport`][maxq.CalibrationReport]."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rows: int = 0  # calibration rows (tokens, or conv output positions) its statistics saw; 0 for magnitude
    loss: float | None = None  # SparseGPT: the OBS estimate of ||(W - W') X^T||^2 / rows; None for the others
    kept_zeros: int = 0  # kept weights that are exactly 0 (see calibrate_: the magnitude-mask tie case)
    skipped: str = ""  # why the layer was not pruned (empty when it was)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class CalibrationReport:
    """What [`maxq.calibrate_`][maxq.calibrate_] did, per layer; ``str(report)`` renders the table."""

    method: str
    n: int
    m: int
    batches: int  # calibration batches used
    seconds: float
    layers: list[LayerCalibration] = field(default_factory=list)

    @property
    def pruned(self) -> list[LayerCalibration]:
        return [r for r in self.layers if not r.skipped]

    @property
    def skipped(self) -> list[LayerCalibration]:
        return [r for r in self.layers if r.skipped]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n": self.n, "m": self.m, "batches": self.batches,
                "seconds": self.seconds, "layers": [r.to_dict() for r in self.layers]}  # fmt: skip

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "n:m", "rows", "loss", "kept zeros", "skipped")
        rows = [head]
        for r in self.layers:
            rows.append((
                r.name, r.kind, "x".join(map(str, r.shape)), "dense" if r.skipped else f"{self.n}:{self.m}",
                str(r.rows) if r.rows else "", "" if r.loss is None else f"{r.loss:.4g}",
                str(r.kept_zeros) if not r.skipped else "", r.skipped,
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        title = f"calibration={self.method} {self.n}:{self.m} batches={self.batches} seconds={self.seconds:.1f}"
        return title + "\n" + "\n".join(lines)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How a calibration batch is fed to the model: a tensor as ``model(batch)``, a mapping (a Hugging Face batch)
    as ``model(**batch)``, a tuple or list (``(inputs, targets)``) as ``model(batch[0])``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # a dict, or a Hugging Face BatchEncoding: keywords of the forward
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


def _take(data: Iterable[Any], count: int | None) -> list[Any]:
    """The first ``count`` batches of ``data`` (every batch for ``None``), drawn once: every group then sees the
    same batches, even from a shuffling loader."""
    if count is None:
        try:
            size = len(data)  # type: ignore[arg-type]
        except TypeError:
            size = None
        if size is not None and size > _MAX_IMPLICIT_BATCHES:
            raise ValueError(
                f"the calibration data has {size} batches; calibration holds its batches in memory and runs a "
                "forward over them per layer group: pass batches=K to draw K of them (e.g. 16 to 128)"
            )
    out = []
    for batch in data:
        if count is not None and len(out) >= count:
            break
        out.append(batch)
    return out


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


class _Stop(Exception):
    """Raised by a hook once the group's last call has been seen: the rest of the forward is not needed."""


def _column_signature(module: nn.Module) -> tuple[Any, ...]:
    """Layers whose inputs map to the same columns (see `input_columns`) can share statistics."""
    if isinstance(module, nn.Conv2d):
        padding = tuple(module._reversed_padding_repeated_twice)
        return ("conv", module.kernel_size, module.stride, module.dilation, padding, module.padding_mode)
    return ("rows",)


def _input_size(module: nn.Module) -> int:
    """``D``, the input columns of `weight_columns`."""
    return module.weight.shape[0] if is_hf_conv1d(module) else module.weight[0].numel()


@dataclass
class _Group:
    names: list[str]
    calls: int  # calls per forward of all members together
    shared: bool  # one input tensor for all members, each called once: one set of statistics


def _trace(
    model: nn.Module, modules: dict[str, nn.Module], batch: Any, forward: Forward
) -> tuple[list[_Group], dict[str, int]]:
    """Run ``forward`` once and group the layers in ``modules`` by the order of their first call (see the module
    doc); returns the groups and how often each layer was called."""
    calls: list[tuple[str, Tensor | None]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((name, _first_tensor(args, kwargs)))  # the tensors stay referenced: no address reuse

        return record

    handles = [mod.register_forward_pre_hook(hook(name), with_kwargs=True) for name, mod in modules.items()]
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    groups: list[_Group] = []
    inputs: list[tuple[Tensor | None, tuple[Any, ...]]] = []  # per group: its first input and column signature
    for name, x in calls:
        if any(name in g.names for g in groups):
            continue
        signature = _column_signature(modules[name])
        for g, (gx, gsig) in zip(groups, inputs):
            if g.shared and x is not None and gx is x and gsig == signature and counts[name] == 1:
                g.names.append(name)
                g.calls += 1
                break
        else:
            groups.append(_Group([name], counts[name], counts[name] == 1))
            inputs.append((x, signature))
    calls.clear()
    return groups, counts


def _collect(
    model: nn.Module,
    group: _Group,
    modules: dict[str, nn.Module],
    batches: Sequence[Any],
    forward: Forward,
    device: torch.device,
    hessian: bool,
) -> dict[str, InputStats]:
    """Input statistics of the group's layers over every batch (shared by its members when ``group.shared``)."""
    members = [modules[name] for name in group.names]

    def new(name: str) -> InputStats:
        module = modules[name]
        return InputStats(_input_size(module), device, hessian=hessian, dtype=compute_dtype(module.weight.dtype))

    shared = new(group.names[0]) if group.shared else None
    stats = {name: shared if shared is not None else new(name) for name in group.names}
    state: dict[str, Any] = {"left": 0, "last": None}

    def hook(name: str) -> Callable[..., None]:
        def add(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_tensor(args, kwargs)
            if x is not None and not (shared is not None and state["last"] is x):
                stats[name].add(input_columns(module, x))
                state["last"] = x
            state["left"] -= 1
            if state["left"] <= 0:
                raise _Stop

        return add

    handles = [mod.register_forward_pre_hook(hook(name), with_kwargs=True) for name, mod in zip(group.names, members)]
    try:
        for batch in batches:
            state["left"], state["last"] = group.calls, None
            with contextlib.suppress(_Stop):
                forward(model, _to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
    return stats


def _prune_layer(
    module: nn.Module, config: CalibrationConfig, stats: InputStats | None
) -> tuple[Tensor, Tensor | None]:
    """Prune one layer in place; return its keep mask (``[O, D]``) and SparseGPT's loss (a 0-d tensor)."""
    weight = weight_columns(module)
    loss = None
    if config.method == "magnitude":
        pruned, keep = magnitude_prune(weight, config.n, config.m)
    elif config.method == "wanda":
        pruned, keep = wanda_prune(weight, stats.mean_square(), config.n, config.m)
    else:
        pruned, keep, loss = sparsegpt_prune(
            weight, stats.hessian(), config.n, config.m, blocksize=config.blocksize, damp=config.damp
        )
    write_columns_(module, pruned)
    return keep, loss


def calibrate_(
    model: nn.Module,
    data: Iterable[Any] | None,
    config: CalibrationConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    forward: Forward | None = None,
    progress: bool | None = None,
    **options: Any,
) -> CalibrationReport:
    """Prune ``model`` to N:M once, in place, from calibration data: Wanda or SparseGPT (or magnitude).

    Layers are processed in the order the forward reaches them, each on the inputs produced by the already pruned
    layers before it. Afterwards every selected layer's weight is exactly N:M: pruned weights are exact zeros,
    kept weights are the model's own (Wanda, magnitude) or reconstructed (SparseGPT). Nothing else changes: layers
    not selected, biases, norms and buffers stay bit for bit.

    The model stays an ordinary model. To fine-tune with this mask fixed, sparsify it next with
    [`maxq.OneShotConfig`][maxq.OneShotConfig] (same ``n``, ``m`` and layer selection): its magnitude mask keeps
    exactly the nonzero weights, i.e. the calibrated mask. Or start SR-STE / MaxQ from it. One tie: a kept weight
    that is exactly 0 (counted per layer as ``kept_zeros``, rare) gives its block more than ``m - n`` zeros, and
    the magnitude mask picks among them by the lower input; the weights are the same either way.

    Args:
        model: any ``nn.Module`` with Linear, Hugging Face Conv1D or Conv2d (``groups == 1``) layers, not
            sparsified yet (calibrate first, then [`maxq.sparsify_`][maxq.sparsify_]); left in its train/eval mode.
        data: the calibration batches (a DataLoader, a list, any iterable); ``config.batches`` of them are drawn
            once and held in memory (on the device the loader gives them; each is moved to the model's device when
            used). Prefer sequences without padding: every row a layer sees counts. ``None`` for ``magnitude``.
        config: a [`CalibrationConfig`][maxq.CalibrationConfig]; or leave it out and pass its fields as keyword
            ``options`` (``method="wanda", n=2, m=4, batches=32``).
        filter_fn: ``(module, qualified_name) -> bool`` choosing layers, as in [`maxq.sparsify_`][maxq.sparsify_];
            default: every eligible layer except the first conv and the last classifier.
        forward: ``(model, batch) -> Any``, how a batch runs through the model; default
            [`default_forward`][maxq.calibrate.default_forward] (tensor, mapping as keywords, or the first
            element of a tuple).
        progress: a tqdm bar over layer groups (default: when stderr is a terminal).

    Returns:
        a [`CalibrationReport`][maxq.CalibrationReport]: per layer the rows seen, SparseGPT's loss estimate, the
        kept zeros, or why it was skipped.

    Raises:
        ValueError: a bad config or option, both ``config`` and options, no calibration data, a model already
            sparsified, no layer to prune, or (``strict``) a requested layer that cannot be N:M.
        TypeError: a selected layer with non-floating-point weights.
    """
    if config is None:
        config = CalibrationConfig(**options)
    elif options:
        raise ValueError(f"pass either a CalibrationConfig or its fields as options, not both (got {sorted(options)})")
    if not isinstance(config, CalibrationConfig):
        raise ValueError(f"config must be a maxq.CalibrationConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if sparsifier_of(model) is not None:
        raise ValueError(
            "model is already sparsified: calibrate the plain model first, then maxq.sparsify_ it (or fold it with "
            "maxq.fold_ before calibrating again)"
        )
    started = time.perf_counter()
    choices = select_layers(model, config.m, filter_fn, skip_first=config.skip_first, skip_last=config.skip_last)
    if config.strict:
        refused = [c for c in choices if c.requested and not c.selected]
        if refused:
            details = "; ".join(f"{c.name}: {c.reason}" for c in refused)
            pattern = f"{config.n}:{config.m}"
            raise ValueError(f"strict mode: {len(refused)} requested layer(s) cannot be {pattern}: {details}")
    all_modules = dict(model.named_modules())
    modules = {c.name: all_modules[c.name] for c in choices if c.selected}
    if not modules:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in choices) or "the model has no Conv2d/Linear layers"
        raise ValueError(f"no layer can be pruned {config.n}:{config.m} ({reasons})")
    for name, module in modules.items():
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {name} already has a parametrization on its weight; calibrate the plain model")
        if not module.weight.is_floating_point():
            raise TypeError(f"layer {name} has {module.weight.dtype} weights; N:M pruning needs floating-point weights")
    rows = {c.name: LayerCalibration(c.name, c.kind, c.shape, skipped="" if c.selected else c.reason)
            for c in choices}  # fmt: skip
    forward = forward or default_forward
    batches: list[Any] = []
    if config.needs_data:
        if data is None:
            raise ValueError(f"{config.method} needs calibration data: pass a DataLoader or a list of batches")
        batches = _take(data, config.batches)
        if not batches:
            raise ValueError("the calibration data yielded no batch")
    keeps: dict[str, Tensor] = {}
    losses: dict[str, Tensor] = {}
    was_training = model.training
    model.eval()  # dropout off, norms on their running statistics: the model as it is deployed
    try:
        with torch.no_grad():
            if not config.needs_data:
                groups, counts = [_Group([name], 1, False) for name in modules], dict.fromkeys(modules, 1)
            else:
                device = next(model.parameters()).device
                groups, counts = _trace(model, modules, _to_device(batches[0], device), forward)
            for name in modules:
                if counts.get(name, 0) == 0:
                    rows[name].skipped = "not called by the model's forward on the calibration data"
                    log.warning("maxq: layer %s is not reached by the calibration forward; it stays dense", name)
            bar = tqdm(groups, desc=f"calibrate {config.method} {config.n}:{config.m}", unit="group",
                       disable=None if progress is None else not progress)  # fmt: skip
            for group in bar:
                stats: dict[str, InputStats] = {}
                if config.needs_data:
                    stats = _collect(model, group, modules, batches, forward, device, config.method == "sparsegpt")
                for name in group.names:
                    layer_stats = stats.get(name)
                    if layer_stats is not None and layer_stats.rows == 0:
                        rows[name].skipped = "no calibration input reached it"
                        continue
                    keeps[name], loss = _prune_layer(modules[name], config, layer_stats)
                    rows[name].rows = layer_stats.rows if layer_stats is not None else 0
                    if loss is not None:
                        losses[name] = loss
                del stats
    finally:
        model.train(was_training)
    for name, keep in keeps.items():  # one host sync per layer, after all the work is queued
        rows[name].kept_zeros = int((keep & (weight_columns(modules[name]) == 0)).sum())
        if name in losses:
            rows[name].loss = float(losses[name])
    report = CalibrationReport(config.method, config.n, config.m, len(batches), time.perf_counter() - started,
                               list(rows.values()))  # fmt: skip
    kept_zeros = sum(r.kept_zeros for r in report.pruned)
    log.info(
        "maxq: calibrated %s %d:%d on %d layer(s) from %d batch(es) in %.1f s%s", config.method, config.n, config.m,
        len(report.pruned), len(batches), report.seconds,
        f"; {kept_zeros} kept weight(s) are exactly 0" if kept_zeros else "",
    )  # fmt: skip
    return report
