"""What both framework callbacks do around the training run (start, metrics, end): one copy, not two."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from ..calibrate.config import CalibrationConfig, calibration_for
from ..core.check import NMCheck, check_nm
from ..core.config import NMConfig
from ..core.layers import FilterFn
from ..core.sparsifier import Report, Sparsifier, sparsifier_of, sparsify_
from ..core.state_keys import original_to_plain_
from ..core.stepping import OptimizerSteps, check_steps_per_epoch

__all__ = [
    "adopt_or_sparsify",
    "callback_calibration",
    "callback_config",
    "check_ramp_fits",
    "check_sharding",
    "epoch_steps",
    "finish",
    "has_ramp",
    "ramp_metrics",
    "save_folded",
]

log = logging.getLogger(__name__)


def adopt_or_sparsify(model: nn.Module, config: NMConfig | None, filter_fn: FilterFn | None) -> Sparsifier:
    """The model's sparsifier: the one the user attached with [`maxq.sparsify_`][maxq.sparsify_] (adopted as is), else a
    new one from ``config``.

    Raises:
        ValueError: the model is not sparsified and no ``config`` was given, or it is sparsified with another
            config than the one given.
    """
    found = sparsifier_of(model)
    if found is not None:
        if config is not None and found.config != config:
            raise ValueError(
                f"the model is already sparsified with {found.config!r}, not with the callback's {config!r}; "
                "pass config=None to adopt the model's sparsifier, or give the callback an unsparsified model"
            )
        log.info(
            "maxq: adopting the model's sparsifier (%s %d:%d)", found.config.method, found.config.n, found.config.m
        )
        return found
    if config is None:
        raise ValueError("the model is not sparsified: give the callback a config (maxq.MaxQConfig(...), ...)")
    return sparsify_(model, config, filter_fn)


def ramp_metrics(sparsifier: Sparsifier) -> dict[str, float]:
    """Scalars for a framework's logger: the ramp's dense fraction ``p`` (set), the measured share of blocks still
    dense and the mean soft scale over the sparsified layers (1 for hard masks). Reads the masks: call it at
    epoch ends, not every step (it waits for the device)."""
    rows = sparsifier.report().sparsified
    count = max(len(rows), 1)
    return {
        "maxq/dense_fraction": float(sparsifier.dense_fraction),
        "maxq/dense_blocks": sum(r.dense_block_fraction or 0.0 for r in rows) / count,
        "maxq/mean_soft_scale": sum(r.mean_soft_scale or 0.0 for r in rows) / count,
    }


def finish(sparsifier: Sparsifier, *, fold: bool, force: bool = False) -> tuple[Report | None, NMCheck | None]:
    """End of training: log the per-layer report (at INFO, on the ``maxq`` logger); with ``fold``, fold the masks
    into plain weights (the model is then an ordinary model that saves and loads without maxq) and check that
    every sparsified layer is exactly N:M.

    Args:
        fold: fold and check (otherwise only report).
        force: fold even if the ramp is unfinished (the remaining dense blocks are pruned first; a warning says so).

    Returns:
        the per-layer [`Report`][maxq.Report] at the end of training (``None`` if the model was folded already)
        and the [`NMCheck`][maxq.NMCheck] of the folded model (``None`` without ``fold``).

    Raises:
        RuntimeError: the folded model is not exactly N:M (never expected), or the ramp is unfinished and not
            ``force`` (the message says so).
    """
    if sparsifier.folded:
        return None, None
    report = sparsifier.report()
    log.info("maxq: per-layer report at the end of training\n%s", report)
    if not fold:
        return report, None
    model, cfg, layers = sparsifier.model, sparsifier.config, sparsifier.layers
    if not sparsifier.ramp_finished and not force:
        raise RuntimeError(
            f"the ramp is unfinished (dense fraction {sparsifier.dense_fraction:.3f}): training ended before the "
            "ramp's end, so the model is not N:M yet. Train longer, end the ramp earlier, or pass "
            "fold_force=True to prune the remaining dense blocks now"
        )
    sparsifier.fold_(force=force)
    result = check_nm(model, cfg.n, cfg.m, layers)
    if not result.ok:
        raise RuntimeError(f"folded model is not {cfg.n}:{cfg.m}:\n{result}")
    log.info("maxq: folded; %d layer(s) exactly %d:%d", len(layers), cfg.n, cfg.m)
    return report, result


def save_folded(sparsifier: Sparsifier) -> Any:
    """From now until the returned handle's ``remove()``, the state dict of the sparsifier's model is the folded
    model's: each sparsified layer's ``...parametrizations.weight.original`` becomes ``<layer>.weight`` holding
    ``W * Mask`` (what [`maxq.fold_`][maxq.fold_] would write), so whatever saves it (``trainer.save_model``,
    ``save_pretrained``, ``torch.save(model.state_dict())``) writes an ordinary model, while the masks stay
    attached. Loading such a state dict back into the sparsified model works too (the sparsifier renames plain
    weights on load)."""
    model = sparsifier.model

    def folded_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if sparsifier.folded:
            return
        with torch.no_grad():
            weights = {name: model.get_submodule(name).weight.detach() for name in sparsifier.layers}
        original_to_plain_(state_dict, prefix, weights)

    register = getattr(model, "register_state_dict_post_hook", None)  # public from torch 2.5
    return (register or model._register_state_dict_hook)(folded_names)


def check_sharding(sparsifier: Sparsifier, hint: str) -> None:
    """At the start of training, once the framework sharded the model (FSDP2): every sparsified weight is sharded
    on its outputs only, so each rank holds whole N:M groups; the mask state follows the sharding now.

    Raises:
        ValueError: a placement that splits N:M groups (an HF ``Conv1D`` sharded on dim 0, FSDP2's default), before
            the first step rather than at it; the message ends with ``hint`` (what to do in this framework).
    """
    try:
        sparsifier._follow_sharding()
    except ValueError as exc:
        raise ValueError(f"{exc}. {hint}") from None


def check_ramp_fits(driver: OptimizerSteps, total_steps: float | None, plan: str, *, fold: bool, force: bool) -> None:
    """At the start of training: does the ramp finish within the planned optimizer steps?

    A ramp that cannot is an error when the run would fold at the end (``fold`` without ``force``: the end would
    refuse, after all the training), else a warning saying what happens to the blocks still dense. Where the plan
    is unknown (``total_steps`` ``None`` or infinite) a warning says the ramp cannot be checked yet.

    Args:
        driver: the run's step driver (its steps per epoch and ramp rules).
        total_steps: optimizer steps the run is planned to take, from its first step (resumed runs included);
            ``None``, 0 or less, or infinite: unknown.
        plan: how the framework was told the run's length (``max_epochs=2``), for the message.

    Raises:
        ValueError: the ramp cannot finish and the model would be folded at the end; the message says what to
            change (the ramp's end, ``per_step``, the run's length, or ``fold_force=True``).
    """
    sp, spe = driver.sparsifier, driver.steps_per_epoch
    cfg = sp.config
    if not has_ramp(cfg) or spe is None:
        return
    start, end = cfg.ramp
    if total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        if cfg.dense_fraction(0.0) > 0.0 or end > 0:
            log.warning(
                "maxq: the run's length is not set (%s), so whether the ramp %g-%g (epochs) finishes in training "
                "cannot be checked now; if it does not, %s",
                plan,
                start,
                end,
                "the end of training refuses to fold" if fold and not force else "the model is not N:M at the end",
            )
        return
    left = cfg.dense_fraction(driver.last_progress(int(total_steps)))
    if left == 0.0:
        return
    epochs = total_steps / spe
    per_step = getattr(cfg, "per_step", False)
    last = epochs if per_step else math.floor((total_steps - 1) / spe)  # the last progress that still trains
    kind = "per step" if per_step else "per-epoch staircase: p moves when an epoch begins"
    fixes = [f"end the ramp by epoch {last:g} (ramp=({min(start, last):g}, {last:g}))"]
    if not per_step:
        fixes.append(f"ramp per step (per_step=True: ends by epoch {epochs:g})")
    fixes.append(f"train longer (the ramp ends at epoch {end:g})")
    message = (
        f"MaxQCallback: the ramp {start:g}-{end:g} ({kind}) does not finish within the planned {int(total_steps)} "
        f"optimizer steps ({plan}: {epochs:g} epochs of {spe} steps): {left:.0%} of the blocks would still be dense "
        f"when training ends. To finish it in training, {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )
    if fold and not force:
        raise ValueError(f"{message}; or pass fold_force=True to prune the blocks still dense at the end")
    consequence = "pruned when folding (fold_force=True)" if fold else "left dense: the model is not N:M (fold=False)"
    log.warning("maxq: %s. As set, they are %s", message, consequence)


def has_ramp(config: NMConfig) -> bool:
    """Whether the method ramps its sparsity over training (only then is progress, and so steps per epoch, read)."""
    return any(f.name == "per_step" for f in dataclasses.fields(config))


def epoch_steps(batches: float | None, accumulation: int, config: NMConfig, framework: str) -> int | None:
    """Optimizer steps per epoch from a framework's count of training batches per epoch and its gradient
    accumulation: ``ceil(batches / accumulation)`` (a last, partial accumulation steps too).

    A loader without a length (``batches`` ``None``, 0 or infinite) gives ``None`` for a method without a ramp
    (progress is never read), and for one with a ramp raises ``ValueError`` saying to pass ``steps_per_epoch``.
    """
    if batches is None or batches == float("inf") or batches < 1:
        if not has_ramp(config):
            return None
        raise ValueError(
            f"MaxQCallback: {framework} cannot count the batches of this training loader (an iterable dataset "
            "without __len__), so the ramp (in epochs) cannot follow the steps; pass "
            "MaxQCallback(steps_per_epoch=...) (optimizer steps per epoch)"
        )
    return max(math.ceil(int(batches) / accumulation), 1)


def callback_config(
    config: NMConfig | None,
    *,
    filter_fn: FilterFn | None,
    per_step: bool | None,
    fold: bool,
    fold_force: bool,
    steps_per_epoch: int | None,
) -> NMConfig | None:
    """Validate the options both framework callbacks take and return the config they train with (``per_step``
    applied). Raises ``ValueError`` with what to pass instead."""
    if config is not None and not isinstance(config, NMConfig):
        raise ValueError(
            "config must be a maxq config such as maxq.MaxQConfig(n=2, m=4, ramp=(0, 2)) (or maxq.SRSTEConfig(...), "
            f"maxq.OneShotConfig(...)), or None to adopt a model sparsified with maxq.sparsify_; got "
            f"{type(config).__name__}"
        )
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(f"filter_fn must be a callable (module, name) -> bool, got {type(filter_fn).__name__}")
    for name, value in (("fold", fold), ("fold_force", fold_force)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if fold_force and not fold:
        raise ValueError("fold_force=True needs fold=True (fold_force only says how to fold)")
    check_steps_per_epoch(steps_per_epoch)
    if per_step is None:
        return config
    if not isinstance(per_step, bool):
        raise ValueError(f"per_step must be True, False or None (the config decides), got {per_step!r}")
    if config is None:
        raise ValueError(
            "per_step needs a config: give the callback one (maxq.MaxQConfig(..., per_step=True)), or set per_step "
            "in the config you sparsified the model with"
        )
    if not has_ramp(config):
        raise ValueError(
            f"per_step applies to methods with a ramp, and {type(config).__name__} has none (only maxq.MaxQConfig "
            "ramps its sparsity); leave per_step=None"
        )
    return dataclasses.replace(config, per_step=per_step)


def callback_calibration(
    config: NMConfig | None, calibration: str | CalibrationConfig | None, data: Any
) -> CalibrationConfig | None:
    """Validate a callback's calibration options: the [`CalibrationConfig`][maxq.CalibrationConfig] to run before
    sparsifying (``None``: no calibration). Raises ``ValueError`` with what to pass instead."""
    if calibration is None:
        if data is not None:
            raise ValueError("calibration_data was given without calibration: pass calibration='sparsegpt' or 'wanda'")
        return None
    if config is None:
        raise ValueError(
            "calibration needs the callback's config (it prunes before the callback sparsifies); for a model you "
            "sparsify yourself, call maxq.calibrate_(model, data, ...) before maxq.sparsify_"
        )
    result = calibration_for(config, calibration)
    if result.needs_data and data is None:
        raise ValueError(f"calibration={result.method!r} needs calibration_data (a DataLoader or a list of batches)")
    return result
