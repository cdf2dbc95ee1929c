"""The stateful layer: attach N:M masks to a model, drive them through training, and report on them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._engine.fused import FusedState, fused_available
from . import saving
from .bits import pack_rows
from .codes import exact_blocks
from .config import CONFIGS, NMConfig
from .layers import FilterFn, LayerChoice, input_axis, select_layers
from .layout import NMLayout
from .masks import MaskSpec, compute_state_, kept_mean, kept_row_chunks, masked_weight, materialize_mask
from .nm import oi_view, to_blocks
from .parametrization import NMMask
from .schedules import check_progress
from .sharding import RowSharding, is_dtensor, move_fsdp_param, row_sharding
from .state_keys import plain_to_original_
from .stepping import check_manual_call

__all__ = [
    "STATE_FORMAT",
    "LayerReport",
    "Report",
    "Sparsifier",
    "saved_masked_weight",
    "sparsifier_of",
    "sparsify_",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "maxq.sparsifier/3"
_STATE_FORMAT_V2 = "maxq.sparsifier/2"  # maxq 0.2: every layer's mask as a weight-sized tensor
_STATE_FORMAT_V1 = "maxq.sparsifier/1"  # maxq 0.1: masks were recomputed inside the training forward
_ATTR = "_maxq_sparsifier"


@dataclass
class LayerReport:
    """One row of [`Sparsifier.report`][maxq.Sparsifier.report]."""

    name: str
    kind: str
    shape: tuple[int, ...]
    nm: str  # "2:4", or "dense" for skipped layers
    dense_block_fraction: float | None = None  # share of blocks currently not N:M (ramp)
    mean_soft_scale: float | None = None  # mean Mask value over kept weights (1 without queries)
    skipped: str = ""  # reason the layer is not sparsified
    mask_bytes: int | None = None  # bytes maxq holds for the layer's mask (its state), see Sparsifier.mask_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class Report:
    """Per-layer table of a sparsified model; ``str(report)`` renders it."""

    method: str
    progress: float | None
    layers: list[LayerReport]

    @property
    def sparsified(self) -> list[LayerReport]:
        return [r for r in self.layers if not r.skipped]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.skipped]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "progress": self.progress, "layers": [r.to_dict() for r in self.layers]}

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "n:m", "dense blocks", "soft scale", "mask bytes", "skipped")
        rows = [head]
        for r in self.layers:
            rows.append(
                (
                    r.name,
                    r.kind,
                    "x".join(map(str, r.shape)),
                    r.nm,
                    "" if r.dense_block_fraction is None else f"{r.dense_block_fraction:.3f}",
                    "" if r.mean_soft_scale is None else f"{r.mean_soft_scale:.3f}",
                    "" if r.mask_bytes is None else str(r.mask_bytes),
                    r.skipped,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"method={self.method} progress={self.progress}\n" + "\n".join(lines)


@dataclass
class _Layer:
    """One sparsified layer: its module, its parametrization, and what its mask updates need."""

    module: nn.Module
    param: NMMask
    priority: Tensor | None  # per-block scores of the random block order
    state: FusedState = field(default_factory=FusedState)  # the fused kernels' thresholds (speed only)

    sharding: RowSharding | None = None  # how the weight is sharded over its rows (FSDP2), if it is

    @property
    def weight(self) -> Tensor:
        return self.module.parametrizations.weight.original

    @property
    def local_weight(self) -> Tensor:
        """The trainable weight as stored, this rank's rows of it if it is sharded."""
        weight = self.weight
        return weight.to_local() if is_dtensor(weight) else weight

    @property
    def oi_weight(self) -> Tensor:
        """The trainable weight (this rank's rows, if sharded) as ``[O, I(, kh, kw)]`` (a view)."""
        return oi_view(self.local_weight, self.param.input_axis)


class Sparsifier:
    """Handle on a model whose layers carry N:M masks; created by [`sparsify_`][maxq.sparsify_].

    The masks are updated only by explicit calls, never inside a forward (torch.ao's idiom):

    ```python
    for epoch in range(epochs):
        sparsifier.set_progress(epoch)      # the ramp: masks recomputed if the dense fraction moves
        for x, y in loader:
            loss = criterion(model(x), y)   # forward: W * mask, nothing else
            optimizer.zero_grad(); loss.backward()
            scaler.unscale_(optimizer)      # with AMP
            sparsifier.regularize_()        # SR-STE decay on pruned weights
            optimizer.step()
            sparsifier.step()               # masks from the updated weights (every update_every steps)
    ```

    [`hook_optimizer`][maxq.Sparsifier.hook_optimizer] makes the two calls around ``optimizer.step()`` automatic.
    """

    #: compute masks with the fused CPU kernels where they apply (False: the device-agnostic path, same masks)
    fused: bool = True

    def __init__(self, model: nn.Module, config: NMConfig, choices: list[LayerChoice]) -> None:
        self.model = model
        self.config = config
        self.choices = choices
        self.progress: float | None = None
        self.steps = 0  # optimizer steps seen by step(); masks are recomputed when steps % update_every == 0
        self._fraction = config.dense_fraction(0.0)
        self.folded = False
        self._layers: dict[str, _Layer] = {}
        self._load_hook = model.register_load_state_dict_post_hook(self._after_load)
        self._plain_hook = model._register_load_state_dict_pre_hook(self._before_load)  # public from torch 2.5
        setattr(model, _ATTR, self)

    # -- attaching -------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        cfg = self.config
        modules = dict(self.model.named_modules())
        for index, choice in enumerate(c for c in self.choices if c.selected):
            module = modules[choice.name]
            weight = module.weight
            param = NMMask(
                weight.shape,
                cfg.n,
                cfg.m,
                straight_through=cfg.straight_through,
                input_axis=input_axis(module),
                soft=cfg.soft,
                tau=cfg.tau,
                frozen=cfg.frozen,
                exact=cfg.exact_n,
            )
            param.to(device=weight.device)  # the state keeps its own dtypes (bits, float32 thresholds)
            sharded = is_dtensor(weight)
            if sharded:  # already sharded (fully_shard before sparsify_): FSDP must find it where it moves
                row_sharding(weight, param.input_axis, choice.name)  # refuse a placement that splits N:M groups
            parametrize.register_parametrization(module, "weight", param, unsafe=sharded)
            if sharded:
                move_fsdp_param(self.model, weight, module.parametrizations.weight, "original")
            self._layers[choice.name] = _Layer(module, param, _priority(cfg, index, weight.numel() // cfg.m))
        # W * mask is rebuilt in backward instead of kept from the forward (maxq.core.saving).
        self._hooks = saving.install([self.model, *(layer.module for layer in self._layers.values())])
        self.update_masks()
        if cfg.frozen:  # one-shot hands the optimizer dense weights with zeros; masked gradients keep them zero
            self._zero_pruned()

    def _zero_pruned(self) -> None:
        """Set the pruned weights of a frozen mask to exactly zero (its forward then uses the weight itself)."""
        self._follow_sharding()
        with torch.no_grad():
            for layer in self._layers.values():
                layer.local_weight.mul_(oi_view(layer.param.kept(), layer.param.input_axis))

    def _follow_sharding(self) -> None:
        """Cut the state of layers whose weight was sharded since the last look (``fully_shard`` after
        ``sparsify_``) to this rank's rows, before anything reads it per row."""
        for name, layer in self._layers.items():
            if layer.sharding is None and is_dtensor(layer.weight):
                self._shard(name, layer)

    def _shard(self, name: str, layer: _Layer) -> RowSharding | None:
        """The layer's row sharding now; the first time its weight is found sharded (``fully_shard`` after
        ``sparsify_``), its state is cut to this rank's rows."""
        sharding = row_sharding(layer.weight, layer.param.input_axis, name)
        if sharding is None or layer.sharding is not None:
            return sharding if sharding is not None else layer.sharding
        param = layer.param
        if not is_dtensor(param.planes):
            param.planes = sharding.distribute(param.planes, 1)
        if param.materialized and not is_dtensor(param.mask):
            param.mask = sharding.distribute(param.mask, sharding.row_dim)
        if layer.priority is not None:  # per block, row-major: this rank's rows' blocks
            per_row = layer.priority.numel() // sharding.rows
            layer.priority = layer.priority[sharding.offset * per_row : (sharding.offset + sharding.local) * per_row]
        layer.state = FusedState()
        layer.sharding = sharding
        return sharding

    # -- mask updates (explicit, outside the forward) -----------------------------------------------------------
    def _restore(self) -> None:
        """Weights a failed backward left masked in place get their pruned values back
        ([`NMMask.restore_`][maxq.core.parametrization.NMMask.restore_]) before anything reads them."""
        for layer in self._layers.values():
            layer.param.restore_()

    def update_masks(self) -> None:
        """Recompute every layer's mask state from its current weight now (no gradient, autocast off). On a sharded
        model every rank must call it (the layer-wide statistics are collectives)."""
        self._check_attached()
        self._restore()
        cfg = self.config
        strength = cfg.soft_strength(self._fraction)
        for name, layer in self._layers.items():
            param = layer.param
            sharding = self._shard(name, layer)
            weight = layer.oi_weight
            if layer.priority is not None and layer.priority.device != weight.device:
                layer.priority = layer.priority.to(weight.device)
            # a coded state: the bit planes written here, then encoded (one layer's bits at a time)
            planes = param.new_bit_planes() if param.coded else param.planes
            compute_state_(  # on [O, I] views: an [in, out] (Conv1D) state is that of its transposed view
                planes.to_local() if is_dtensor(planes) else planes,
                param.thresholds_f32,
                weight,
                cfg.n,
                cfg.m,
                dense_fraction=self._fraction,
                order=cfg.order,
                priority=layer.priority,
                tau=cfg.tau,
                soft=cfg.soft,
                state=layer.state,
                fused=self.fused,
                sharding=sharding,
            )
            if param.coded:
                param.store_bits_(planes)
            # The state is the same whichever path computed it; the soft values are rebuilt with the fused kernels'
            # operations wherever they run (as the float mask was written), else with the device-agnostic ones.
            self._finish_state(param, layer.weight, self.fused and fused_available(weight), strength)
            if cfg.frozen:  # never updated again: the kernels' guesses for the next update are not needed
                layer.state = FusedState()

    def _finish_state(self, param: NMMask, weight: Tensor, fused: bool, strength: float) -> None:
        """After a state update: which formula rebuilds the mask, the warm-up's scale, and whether a weight-sized
        mask must be held (a soft mask not updated at every step keeps the values of the weights it came from)."""
        cfg = self.config
        spec = MaskSpec(
            cfg.n,
            cfg.m,
            cfg.soft,
            cfg.tau,
            param.input_axis,
            fused,
            cfg.soft and getattr(cfg, "soft_warmup", "none") == "ramp",
            cfg.soft and cfg.normalize_soft,
        )
        if spec != param.spec:
            param.spec = spec
        scale = param.scale_f32
        if spec.strength:
            scale[0] = strength
        if spec.normalize:  # over the whole layer (gathered where sharded: the same sum as one process)
            whole, planes = replace(spec, normalize=False), param.bit_planes(whole=True)
            warmed = materialize_mask(param._full(weight), planes, param.thresholds_f32, scale, whole)
            scale[1].copy_(kept_mean(warmed))
        if param.materialized:
            param.mask = torch.zeros(0, dtype=param.mask.dtype, device=param.thresholds.device)
        if cfg.soft and (cfg.update_every > 1 or getattr(cfg, "keep_soft_mask", False)):
            mask = param.mask_for(weight)
            sharding = row_sharding(weight, param.input_axis)
            param.mask = sharding.distribute(mask, sharding.row_dim) if sharding is not None else mask

    def step(self, progress: float | None = None) -> bool:
        """Count one optimizer step; call it once right after every ``optimizer.step()``.

        Every ``update_every`` steps the masks are recomputed from the updated weights, so the next forward uses
        the masks of the weights it sees (the paper's per-step update). A frozen (one-shot) mask never changes.

        Args:
            progress: optional training progress in epochs for the step to come (a per-step ramp): the same as
                calling [`set_progress`][maxq.Sparsifier.set_progress] first, but the masks are computed once, not
                twice.

        Returns:
            whether the masks were recomputed.
        """
        self._check_attached()
        self._follow_sharding()
        check_manual_call(self, "step")
        changed = self._set_fraction(progress) if progress is not None else False
        self.steps += 1
        if self.config.frozen or not (changed or self.steps % self.config.update_every == 0):
            return False
        self.update_masks()
        return True

    def set_progress(self, epoch: float) -> float:
        """Set training progress (in epochs, fractional allowed) and return the dense fraction ``p`` it implies.

        Call it at the start of every epoch (paper staircase) or every step with ``epoch + i / steps`` (per-step
        ramp; or pass the progress to [`step`][maxq.Sparsifier.step]). If ``p`` changes, the masks are recomputed at
        once.

        Raises:
            ValueError: ``epoch`` is negative, not finite or not a number.
        """
        self._check_attached()
        if self._set_fraction(epoch) and not self.config.frozen:
            self.update_masks()
        return self._fraction

    def _set_fraction(self, progress: float) -> bool:
        """Record ``progress``; True if the dense fraction it implies differs from the current one."""
        self.progress = check_progress(progress)
        fraction = self.config.dense_fraction(self.progress)
        changed = fraction != self._fraction
        self._fraction = fraction
        return changed

    def _before_load(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A plain state dict (dense, or folded) is loading: its ``<layer>.weight`` go to the sparsified layers'
        ``...parametrizations.weight.original`` (`maxq.core.state_keys.plain_to_original_`); the masks are
        then recomputed from them (`_after_load`). A one-shot mask is computed once, at ``sparsify_``, so
        new dense weights would keep a mask that is not theirs: refused, saying what to do."""
        if self.folded or not plain_to_original_(state_dict, prefix, self._layers):
            return
        if self.config.frozen:
            raise ValueError(
                "loading plain (dense) weights into a model sparsified with OneShotConfig: its mask was computed "
                "once, from the weights it had at maxq.sparsify_, and would not be the new weights' mask. Load the "
                "weights first, then call maxq.sparsify_ (or resume with a state dict saved from the sparsified "
                "model, plus sparsifier.state_dict())"
            )

    def _after_load(self, module: nn.Module, incompatible: Any) -> None:
        """New weights were loaded into the model: their masks replace the old ones. A one-shot mask is taken
        afresh from the loaded weights and frozen again (its pruned weights set to zero, as its forward expects);
        a checkpoint's own mask then comes with ``load_state_dict``."""
        if self.folded:
            return
        self.update_masks()
        if self.config.frozen:
            self._zero_pruned()

    @property
    def dense_fraction(self) -> float:
        """Current ``p`` (share of blocks kept dense)."""
        return self._fraction

    @property
    def ramp_finished(self) -> bool:
        return self._fraction == 0.0

    def finish_ramp(self) -> None:
        """Prune the blocks the ramp still keeps dense, now (``p = 0``, masks recomputed)."""
        if not self.ramp_finished:
            self._fraction = 0.0
            self.update_masks()

    def regularize_(self) -> None:
        """SR-STE decay on pruned weights: ``grad += lambda * (1 - clamp(Mask, 0, 1)) * W``.

        Call after ``backward()`` (and after ``GradScaler.unscale_``), before ``optimizer.step()``. A no-op for
        methods without decay; parameters without a gradient are left alone.
        """
        check_manual_call(self, "regularize_")
        self._restore()
        lam = self.config.decay
        if lam == 0.0:
            return
        self._follow_sharding()
        with torch.no_grad():
            for layer in self._layers.values():
                param = layer.param
                grad = layer.weight.grad
                if grad is None:
                    continue
                grad = grad.to_local() if is_dtensor(grad) else grad  # sharded: this rank's rows, like the state
                weight = layer.local_weight
                # Kept weights have Mask >= 1 and pruned ones 0, so 1 - clamp(Mask, 0, 1) = [not kept].
                planes = param.bit_planes()
                g, w = oi_view(grad, param.input_axis), oi_view(weight.detach(), param.input_axis)
                if _fusable(grad) and _fusable(weight) and fused_available(weight):
                    torch.ops.maxq.decay_bits_(g, w, planes, lam)
                else:  # row chunks: a chunk's bool mask and masked copy at a time, not the layer's
                    for first, end, kept in kept_row_chunks(w, planes):
                        g[first:end].add_(w[first:end].masked_fill(kept, 0.0), alpha=lam)

    def hook_optimizer(self, optimizer: Any, steps_per_epoch: int | None = None) -> list[Any]:
        """Automatic mode: [`regularize_`][maxq.Sparsifier.regularize_] before and [`step`][maxq.Sparsifier.step] after
        every ``optimizer.step()``.

        The rules are [`OptimizerSteps`][maxq.core.stepping.OptimizerSteps]' (the one owner of what happens around an
        optimizer step). With ``GradScaler``, ``scaler.step(optimizer)`` unscales before calling
        ``optimizer.step()``, so the decay sees true gradients; a step the scaler skips (inf/NaN gradients) is not
        counted. A closure passed to ``step()`` (LBFGS, Lightning) is wrapped so the decay follows the gradients
        it computes.

        Args:
            optimizer: a ``torch.optim.Optimizer``, or a wrapper around one (accelerate's
                ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): the hooks go on the torch optimizer.
            steps_per_epoch: optimizer steps per epoch; with it the ramp moves by itself (progress = steps /
                ``steps_per_epoch`` epochs, counted from this sparsifier's `steps`), so no
                [`set_progress`][maxq.Sparsifier.set_progress] calls are needed.

        Returns:
            the hook handles (``.remove()`` one of them to take both hooks off and go back to explicit calls).

        Raises:
            TypeError: ``optimizer`` is no torch optimizer and wraps none (the message says what to pass).
            RuntimeError: this sparsifier's optimizer is hooked already (remove those hooks first). Once hooked,
                calling [`regularize_`][maxq.Sparsifier.regularize_] or [`step`][maxq.Sparsifier.step] by hand raises
                ``RuntimeError`` too: the hooks make those calls, and making them twice would count every step twice and
                double the decay.
        """
        from .stepping import OptimizerSteps

        driver = OptimizerSteps(self, steps_per_epoch=steps_per_epoch, eager=True)
        if steps_per_epoch is not None:
            driver.begin_step(self.steps)
        return driver.hook(optimizer)

    # -- introspection ---------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Qualified names of the sparsified layers."""
        return list(self._layers)

    @property
    def layout(self) -> NMLayout:
        """The N:M layout this sparsifier gives its model (what folding records and files store)."""
        transposed = tuple(name for name, layer in self._layers.items() if layer.param.input_axis == 0)
        return NMLayout(self.config.n, self.config.m, tuple(self._layers), self.config.method, transposed)

    def named_masks(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, mask)`` of every sparsified layer: the mask the next forward multiplies the weight by (stored
        shape, the weight's dtype; 0 on pruned weights, ``>= 1`` on kept ones). Each is a new tensor, rebuilt
        from the layer's mask state: maxq does not keep weight-sized masks."""
        for name, layer in self._layers.items():
            yield name, layer.param.mask_for(layer.weight)

    def mask_bytes(self) -> dict[str, int]:
        """Bytes maxq holds for every sparsified layer's mask: its state (bit planes, thresholds, warm-up scale, a
        weight-sized mask where one is kept), the random block order's priorities and the fused kernels' guesses.
        Divide by the weight's bytes for the cost per weight byte (1 bit per weight of fp32 is 1/32)."""
        out = {}
        for name, layer in self._layers.items():
            extra = 0 if layer.priority is None else layer.priority.numel() * layer.priority.element_size()
            out[name] = layer.param.nbytes + extra + layer.state.nbytes
        return out

    def report(self) -> Report:
        """Per-layer table: shape, n:m, dense-block fraction, mean soft scale, mask bytes, and why skipped layers are
        dense."""
        rows = []
        bytes_ = self.mask_bytes()
        for choice in self.choices:
            if choice.name not in self._layers:
                rows.append(LayerReport(choice.name, choice.kind, choice.shape, "dense", skipped=choice.reason))
                continue
            layer = self._layers[choice.name]
            param = layer.param
            with torch.no_grad():
                kept_per_block = _blocks_nonzero(param.kept(whole=True), param.m)
                dense = float((kept_per_block > param.n).float().mean())
                mask = param.mask_for(layer.weight)
                kept = mask[mask != 0]
                scale = float(kept.float().mean()) if kept.numel() else 0.0
            row = LayerReport(choice.name, choice.kind, choice.shape, f"{param.n}:{param.m}", dense, scale)
            row.mask_bytes = bytes_[choice.name]
            rows.append(row)
        return Report(self.config.method, self.progress, rows)

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: config, progress, step counter and every layer's mask state (bit
        planes, thresholds, warm-up scale; a weight-sized mask only where one is held)."""
        layers = {}
        for name, layer in self._layers.items():
            param = layer.param
            entry: dict[str, Any] = {
                "planes": self._saved_planes(layer),
                "thresholds": param.thresholds_f32.detach().clone(),
                "scale": param.scale_f32.detach().clone(),
                "fused": param.spec.fused,
                "input_axis": param.input_axis,
                "dense_fraction": self._fraction,
            }
            if param.materialized:
                entry["mask"] = param.mask.detach().clone()
            layers[name] = entry
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "progress": self.progress,
            "step": self.steps,
            "dense_fraction": self._fraction,
            "layers": layers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore [`state_dict`][maxq.Sparsifier.state_dict] (load the model's weights first); raises ``ValueError``
        naming the mismatch if it is for another setup. States written by earlier maxq versions (whole float masks)
        load too."""
        formats = (STATE_FORMAT, _STATE_FORMAT_V2, _STATE_FORMAT_V1)
        if not isinstance(state, dict) or state.get("format") not in formats:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not a maxq sparsifier state (format {found!r}; this maxq reads {list(formats)}): pass the dict "
                "Sparsifier.state_dict() returned"
            )
        saved = state["config"]
        mine = self.config.to_dict()
        for key in ("method", "n", "m"):
            if saved.get(key) != mine.get(key):
                raise ValueError(
                    f"sparsifier state is for {key}={saved.get(key)!r}, this sparsifier has {mine.get(key)!r}"
                )
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differ:
            log.warning(
                "maxq: the sparsifier state was saved with other settings (saved %s, this sparsifier %s); training "
                "continues with this sparsifier's. To continue the saved run exactly, build the config with the saved "
                "values (e.g. maxq.make_config(%r, **saved)) before loading the state",
                {k: saved.get(k) for k in differ},
                {k: mine.get(k) for k in differ},
                mine.get("method"),
            )
        layers = state["layers"]
        if set(layers) != set(self._layers):
            missing, extra = sorted(set(self._layers) - set(layers)), sorted(set(layers) - set(self._layers))
            raise ValueError(f"sparsifier state has other layers: missing {missing}, unexpected {extra}")
        legacy = state["format"] != STATE_FORMAT
        for name, entry in layers.items():
            param = self._layers[name].param
            if legacy:
                found, expected = tuple(entry["mask"].shape), param.shape
                what = "mask"
            else:
                found, expected = tuple(entry["planes"].shape), param.planes_shape
                what = "mask state (bit planes)"
                if found == expected and entry["thresholds"].numel() != param.thresholds.numel():
                    found, expected = (entry["thresholds"].numel(),), (param.thresholds.numel(),)
                    what = "mask state (thresholds)"
            if found != expected:
                raise ValueError(f"sparsifier state: {what} of {name} has shape {found}, the layer has {expected}")
            if param.coded:  # checked before anything is written: a code holds exactly n a block
                _check_exact(name, param, _saved_bits(entry, param, legacy))
        strength = self.config.soft_strength(float(state.get("dense_fraction", 0.0)))
        for name, entry in layers.items():
            layer = self._layers[name]
            sharding = self._shard(name, layer)
            if legacy:
                self._load_legacy_mask(layer, entry["mask"], sharding)
                continue
            param = layer.param
            param.store_bits_(_local_rows(entry["planes"], 1, sharding))
            param.thresholds_f32.copy_(_whole(entry["thresholds"]))
            fused = bool(entry["fused"]) and self.fused and fused_available(layer.oi_weight)
            self._finish_state(param, layer.weight, fused, strength)
            param.scale_f32.copy_(_whole(entry["scale"]))
            if "mask" in entry:
                mask = _whole(entry["mask"]).detach().to(param.thresholds.device)
                param.mask = sharding.distribute(mask, sharding.row_dim) if sharding is not None else mask.clone()
        fractions = [float(e["dense_fraction"]) for e in layers.values()]
        self._fraction = float(state.get("dense_fraction", max(fractions, default=0.0)))
        self.progress = state["progress"]
        self.steps = int(state["step"])
        if self.config.frozen:
            self._zero_pruned()
        if (
            state["format"] == _STATE_FORMAT_V1
            and not self.config.frozen
            and self.steps % self.config.update_every == 0
        ):
            # maxq 0.1 recomputed masks at the next training forward when its counter said so; do it now.
            self.update_masks()

    def _saved_planes(self, layer: _Layer) -> Tensor:
        """A layer's bit planes for its saved state: a copy of the state, or decoded from its code (sharded like the
        state), so that a saved state is the same whichever way the mask was held."""
        param = layer.param
        if not param.coded:
            return param.planes.detach().clone()
        bits = param.bit_planes()
        if layer.sharding is not None:
            return layer.sharding.from_local(bits, 1, param.planes_shape)
        return bits

    def _load_legacy_mask(self, layer: _Layer, mask: Tensor, sharding: RowSharding | None) -> None:
        """A whole float mask (maxq 0.2 and earlier): its kept bits exactly, and for a soft mask the mask itself,
        held whole until the next update (which returns to the lean state)."""
        param = layer.param
        mask = _whole(mask).to(param.thresholds.device)
        keep = oi_view(mask, param.input_axis) != 0
        if sharding is not None:
            keep = keep.narrow(0, sharding.offset, sharding.local)
        bits = pack_rows(keep.reshape(keep.shape[0], -1))
        if param.coded:
            param.store_bits_(bits.unsqueeze(0))
        else:
            planes = param.planes.to_local() if is_dtensor(param.planes) else param.planes
            planes[0].copy_(bits)
        if param.spec.soft:
            mask = mask.detach().clone().to(layer.local_weight.dtype)
            param.mask = sharding.distribute(mask, sharding.row_dim) if sharding is not None else mask
        elif param.materialized:
            param.mask = torch.zeros(0, dtype=param.mask.dtype, device=param.thresholds.device)

    # -- folding ---------------------------------------------------------------------------------------------
    def fold_(self, force: bool = False) -> nn.Module:
        """Same as [`maxq.fold_`][maxq.fold_] on this sparsifier's model."""
        from .fold import fold_

        return fold_(self.model, force=force)

    def _check_attached(self) -> None:
        if self.folded:
            raise RuntimeError("this Sparsifier's model was folded; its masks are gone")

    def _detach(self) -> None:
        """Forget the model (after folding)."""
        self._load_hook.remove()
        self._plain_hook.remove()
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._layers.clear()
        self.folded = True
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)


def saved_masked_weight(weight: Tensor, entry: dict[str, Any], config: dict[str, Any]) -> Tensor:
    """``W * Mask`` of a stored weight from one layer entry of a saved ``Sparsifier.state_dict()`` (any format) and
    its ``config`` record: what an eval forward of the saved model would use, without building the model."""
    if "mask" in entry:  # a whole mask (maxq 0.2 and earlier; a soft mask held whole)
        return weight * entry["mask"].to(weight.dtype)
    from .config import config_options, make_config

    method = config["method"]
    cfg = make_config(method, **{k: (tuple(v) if k == "ramp" else v) for k, v in config.items()
                                 if k in config_options(method)})  # fmt: skip
    spec = MaskSpec(
        cfg.n,
        cfg.m,
        cfg.soft,
        cfg.tau,
        int(entry.get("input_axis", 1)),
        bool(entry.get("fused", False)),
        cfg.soft and getattr(cfg, "soft_warmup", "none") == "ramp",
        cfg.soft and cfg.normalize_soft,
    )
    planes, thresholds, scale = entry["planes"], entry["thresholds"], entry["scale"]
    return masked_weight(weight, planes, thresholds.to(torch.float32), scale.to(torch.float32), spec)


def _priority(config: NMConfig, index: int, blocks: int) -> Tensor | None:
    """The random block order's per-block scores of layer ``index``, as the smallest integer type that holds them
    (the scores are a permutation of ``0 .. blocks - 1``, exact in float32 wherever they are used)."""
    scores = config.block_priority(index, blocks)
    if scores is None:
        return None
    return scores.to(torch.int16 if blocks <= 2**15 else torch.int32)


def _whole(t: Tensor) -> Tensor:
    """A saved tensor whole (a DTensor is gathered: a collective)."""
    return t.full_tensor() if is_dtensor(t) else t


def _saved_bits(entry: dict[str, Any], param: NMMask, legacy: bool) -> Tensor:
    """A saved layer's kept bit plane, whole (uint8 ``[1, O, ceil(L / 8)]``; a sharded one gathered: a collective)."""
    if legacy:  # a whole float mask (maxq 0.2 and earlier)
        keep = oi_view(_whole(entry["mask"]), param.input_axis) != 0
        return pack_rows(keep.reshape(keep.shape[0], -1)).unsqueeze(0)
    return _whole(entry["planes"])[:1]


def _check_exact(name: str, param: NMMask, bits: Tensor) -> None:
    """Refuse a saved mask that a kept-index code cannot hold: one that keeps other than ``n`` of some block."""
    oi = param.oi_shape
    if not exact_blocks(bits, param.n, param.m, math.prod(oi[1:]), math.prod(oi[2:])):
        raise ValueError(
            f"sparsifier state: the mask of {name} keeps other than {param.n} of some block of {param.m}, which this "
            f"method never does (was it saved by another method or pattern?); load it into a sparsifier with the "
            f"config it was saved with"
        )


def _local_rows(src: Tensor, dim: int, sharding: RowSharding | None) -> Tensor:
    """This rank's part (along ``dim``) of a saved state tensor, whatever the sharding it was saved with."""
    if sharding is None:
        return _whole(src)
    if is_dtensor(src) and tuple(src.placements) == tuple(sharding.state_placements(dim)):
        return src.to_local()
    return _whole(src).narrow(dim, sharding.offset, sharding.local)


def _fusable(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def sparsifier_of(model: nn.Module) -> Sparsifier | None:
    """The [`Sparsifier`][maxq.Sparsifier] attached to ``model`` (its root module), or ``None``."""
    return getattr(model, _ATTR, None)


#: layers that renormalize activations, so a constant scale on the weights before them does not compound
_NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def _has_normalization(model: nn.Module) -> bool:
    """Whether ``model`` holds a normalization layer (by class, or by a class name ending in ``Norm``/``Norm2d``:
    timm and HF define their own)."""
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, _NORMALIZATION) or name.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d")):
            return True
    return False


def _mean_kept_scale(sparsifier: Sparsifier) -> float:
    """Mean mask value over the kept weights of every sparsified layer (1 for hard masks)."""
    with torch.no_grad():
        total, count = 0.0, 0
        for _, mask in sparsifier.named_masks():
            kept = mask[mask != 0]
            total, count = total + float(kept.double().sum()), count + kept.numel()
    return total / max(count, 1)


def _blocks_nonzero(mask: Tensor, m: int) -> Tensor:
    """Nonzeros per N:M block of a weight-shaped tensor, ``[G]``."""
    return (to_blocks(mask, m) != 0).sum(-1)


def sparsify_(model: nn.Module, config: NMConfig, filter_fn: FilterFn | None = None) -> Sparsifier:
    """Attach N:M masks to ``model`` in place and return the [`Sparsifier`][maxq.Sparsifier] that drives them.

    Args:
        model: any ``nn.Module`` (torchvision, timm, your own); its classes are not changed.
        config: [`MaxQConfig`][maxq.MaxQConfig], [`SRSTEConfig`][maxq.SRSTEConfig] or
            [`OneShotConfig`][maxq.OneShotConfig].
        filter_fn: ``(module, qualified_name) -> bool`` choosing layers; default: every eligible Conv2d/Linear/HF
            Conv1D except the first conv and the last classifier (METHOD.md §1).

    Raises:
        TypeError: ``config`` is not a maxq config, or a selected layer has non-floating-point weights.
        ValueError: no layer can be sparsified, a layer is already parametrized, or (``strict``) a requested
            layer cannot be N:M.
    """
    if not isinstance(config, NMConfig) or type(config) not in CONFIGS.values():
        raise TypeError(f"config must be one of {[c.__name__ for c in CONFIGS.values()]}, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if sparsifier_of(model) is not None:
        raise ValueError("model is already sparsified; fold it (maxq.fold_) before sparsifying again")
    choices = select_layers(model, config.m, filter_fn, skip_first=config.skip_first, skip_last=config.skip_last)
    modules = dict(model.named_modules())
    if config.strict:
        refused = [c for c in choices if c.requested and not c.selected]
        if refused:
            details = "; ".join(f"{c.name}: {c.reason}" for c in refused)
            raise ValueError(
                f"strict mode: {len(refused)} requested layer(s) cannot be {config.n}:{config.m}: {details}"
            )
    for c in choices:
        if not c.selected:
            continue
        module = modules[c.name]
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {c.name} already has a parametrization on its weight")
        if not module.weight.is_floating_point():
            raise TypeError(f"layer {c.name} has {module.weight.dtype} weights; N:M masks need floating-point weights")
    if not any(c.selected for c in choices):
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in choices) or "the model has no Conv2d/Linear layers"
        raise ValueError(f"no layer can be sparsified with {config.n}:{config.m} ({reasons})")
    sparsifier = Sparsifier(model, config, choices)
    sparsifier._attach()
    if config.soft and sum(c.selected for c in choices) > 1 and not _has_normalization(model):
        log.warning(
            "maxq: %s's soft mask multiplies every kept weight by 1 to 3 (1 + Q_f + Q_k), and this model has no "
            "normalization layer (BatchNorm, LayerNorm, GroupNorm, ...) to absorb the scale, so activations can "
            "grow with depth (about %.1fx per sparsified layer now). The method assumes normalized networks; for "
            "this one consider SRSTEConfig or MaxQConfig(queries=False).",
            config.method,
            _mean_kept_scale(sparsifier),
        )
    for c in choices:
        if not c.selected:
            log.info("maxq: layer %s (%s) stays dense: %s", c.name, c.kind, c.reason)
    log.info("maxq: %s %d:%d on %d layer(s)", config.method, config.n, config.m, len(sparsifier.layers))
    return sparsifier
