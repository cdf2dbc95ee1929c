"""The stateful layer: attach N:M masks to a model, drive them through training, and report on them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._engine.kernels import cpu_kernels
from .._engine.workspace import Workspace
from .config import CONFIGS, MaxQConfig, NMConfig
from .layers import FilterFn, LayerChoice, select_layers
from .layout import NMLayout
from .nm import to_blocks
from .parametrization import NMMask
from .schedules import dense_fraction

__all__ = ["STATE_FORMAT", "LayerReport", "Report", "Sparsifier", "sparsifier_of", "sparsify_"]

log = logging.getLogger(__name__)

STATE_FORMAT = "maxq.sparsifier/1"
_ATTR = "_maxq_sparsifier"


@dataclass
class LayerReport:
    """One row of :meth:`Sparsifier.report`."""

    name: str
    kind: str
    shape: tuple[int, ...]
    nm: str  # "2:4", or "dense" for skipped layers
    dense_block_fraction: float | None = None  # share of blocks currently not N:M (ramp)
    mean_soft_scale: float | None = None  # mean Mask value over kept weights (1 without queries)
    skipped: str = ""  # reason the layer is not sparsified

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
        head = ("layer", "type", "shape", "n:m", "dense blocks", "soft scale", "skipped")
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
                    r.skipped,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"method={self.method} progress={self.progress}\n" + "\n".join(lines)


class Sparsifier:
    """Handle on a model whose layers carry N:M masks; created by :func:`sparsify_`.

    Training loop contract (one forward of the root model per step)::

        sparsifier.set_progress(epoch)          # each epoch (or each step for a per-step ramp)
        loss = criterion(model(x), y)           # training forward recomputes the masks
        loss.backward()
        scaler.unscale_(optimizer)              # with AMP
        sparsifier.regularize_()                # SR-STE decay on pruned weights
        optimizer.step()
    """

    def __init__(self, model: nn.Module, config: NMConfig, choices: list[LayerChoice]) -> None:
        self.model = model
        self.config = config
        self.choices = choices
        self.progress: float | None = None
        self.step = 0  # training forwards seen (mask updates happen when step % update_every == 0)
        self.workspace = Workspace()
        self.folded = False
        self._layers: dict[str, tuple[nn.Module, NMMask]] = {}
        self._hook = model.register_forward_pre_hook(self._on_forward)
        setattr(model, _ATTR, self)

    # -- attaching -------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        cfg = self.config
        modules = dict(self.model.named_modules())
        initial_p = self._fraction(0.0)
        for index, choice in enumerate(c for c in self.choices if c.selected):
            module = modules[choice.name]
            weight = module.weight
            priority = None
            if isinstance(cfg, MaxQConfig) and cfg.order == "random":
                gen = torch.Generator().manual_seed(cfg.seed * 100_003 + index)
                priority = torch.randperm(weight.numel() // cfg.m, generator=gen).to(weight.device, torch.float32)
            param = NMMask(
                weight.shape,
                cfg.n,
                cfg.m,
                soft=cfg.soft,
                tau=getattr(cfg, "tau", 0.01),
                order=getattr(cfg, "order", "smallest"),
                straight_through=cfg.straight_through,
                frozen=cfg.frozen,
                dense_fraction=initial_p,
                priority=priority,
                workspace=self.workspace,
            ).to(weight.device)
            # Registration evaluates the parametrization once: that computes the first mask.
            parametrize.register_parametrization(module, "weight", param)
            if cfg.frozen:  # one-shot hands the optimizer dense weights with zeros; masked gradients keep them zero
                with torch.no_grad():
                    module.parametrizations.weight.original.mul_(param.mask)
            self._layers[choice.name] = (module, param)

    # -- training hooks --------------------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if not module.training:
            return
        if self.step % self.config.update_every == 0:
            self._mark_stale()
        self.step += 1

    def _mark_stale(self) -> None:
        for _, param in self._layers.values():
            param.stale = True

    def _fraction(self, epoch: float) -> float:
        cfg = self.config
        if not isinstance(cfg, MaxQConfig):
            return 0.0
        start, end = cfg.ramp
        return dense_fraction(cfg.schedule, epoch, start, end, per_step=cfg.per_step, b=cfg.exp_rate)

    def set_progress(self, epoch: float) -> float:
        """Set training progress (in epochs, fractional allowed) and return the dense fraction ``p`` it implies.

        Call it at the start of every epoch (paper staircase) or every step with ``epoch + i / steps`` (per-step
        ramp). Masks pick the new ``p`` up at the next training forward.
        """
        self._check_attached()
        self.progress = float(epoch)
        p = self._fraction(self.progress)
        if self.config.frozen:
            return 0.0
        for _, param in self._layers.values():
            if param.dense_fraction != p:
                param.dense_fraction = p
                param.stale = True
        return p

    @property
    def dense_fraction(self) -> float:
        """Current ``p`` (share of blocks kept dense)."""
        return max((param.dense_fraction for _, param in self._layers.values()), default=0.0)

    @property
    def ramp_finished(self) -> bool:
        return self.dense_fraction == 0.0

    def regularize_(self) -> None:
        """SR-STE decay on pruned weights: ``grad += lambda * (1 - clamp(Mask, 0, 1)) * W``.

        Call after ``backward()`` (and after ``GradScaler.unscale_``), before ``optimizer.step()``. A no-op for
        methods without decay; parameters without a gradient are left alone.
        """
        lam = self.config.decay
        if lam == 0.0:
            return
        ext = cpu_kernels()
        for module, param in self._layers.values():
            weight = module.parametrizations.weight.original
            grad = weight.grad
            if grad is None:
                continue
            # Mask is 0 exactly on pruned weights (kept ones are >= 1), so 1 - clamp(Mask, 0, 1) = [Mask == 0].
            if ext is not None and all(_fusable(t) for t in (grad, weight, param.mask)):
                ext.decay_(grad, weight.detach(), param.mask, lam)
                continue
            pruned = self.workspace.get("pruned", weight.shape, weight.dtype, weight.device)
            torch.eq(param.mask, 0, out=pruned)
            grad.addcmul_(weight.detach(), pruned, value=lam)

    # -- introspection ---------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Qualified names of the sparsified layers."""
        return list(self._layers)

    @property
    def layout(self) -> NMLayout:
        """The N:M layout this sparsifier gives its model (what folding records and files store)."""
        return NMLayout(self.config.n, self.config.m, tuple(self._layers), self.config.method)

    def named_masks(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, mask)`` of every sparsified layer (the mask the next eval forward uses)."""
        for name, (_, param) in self._layers.items():
            yield name, param.mask

    def report(self) -> Report:
        """Per-layer table: shape, n:m, dense-block fraction, mean soft scale, and why skipped layers are dense."""
        rows = []
        for choice in self.choices:
            if choice.name not in self._layers:
                rows.append(LayerReport(choice.name, choice.kind, choice.shape, "dense", skipped=choice.reason))
                continue
            _, param = self._layers[choice.name]
            with torch.no_grad():
                mask = param.mask
                kept_per_block = _blocks_nonzero(mask, param.m)
                dense = float((kept_per_block > param.n).float().mean())
                kept = mask[mask != 0]
                scale = float(kept.float().mean()) if kept.numel() else 0.0
            rows.append(LayerReport(choice.name, choice.kind, choice.shape, f"{param.n}:{param.m}", dense, scale))
        return Report(self.config.method, self.progress, rows)

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: config, progress, step counter and every layer's mask."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "progress": self.progress,
            "step": self.step,
            "layers": {
                name: {
                    "mask": param.mask.detach().clone(),
                    "dense_fraction": param.dense_fraction,
                    "computed": param.computed,
                }
                for name, (_, param) in self._layers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` naming the mismatch if it is for another setup."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a maxq sparsifier state (expected format {STATE_FORMAT!r})")
        saved = state["config"]
        mine = self.config.to_dict()
        for key in ("method", "n", "m"):
            if saved.get(key) != mine.get(key):
                raise ValueError(
                    f"sparsifier state is for {key}={saved.get(key)!r}, this sparsifier has {mine.get(key)!r}"
                )
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differ:
            log.warning("sparsifier state was saved with different settings: %s", {k: saved.get(k) for k in differ})
        layers = state["layers"]
        if set(layers) != set(self._layers):
            missing, extra = sorted(set(self._layers) - set(layers)), sorted(set(layers) - set(self._layers))
            raise ValueError(f"sparsifier state has other layers: missing {missing}, unexpected {extra}")
        for name, entry in layers.items():
            _, param = self._layers[name]
            saved_shape, shape = tuple(entry["mask"].shape), tuple(param.mask.shape)
            if saved_shape != shape:
                raise ValueError(f"sparsifier state: mask of {name} has shape {saved_shape}, the layer has {shape}")
        for name, entry in layers.items():
            _, param = self._layers[name]
            param.mask.copy_(entry["mask"])
            param.dense_fraction = float(entry["dense_fraction"])
            param.computed = bool(entry.get("computed", True))
            param.stale = False
        self.progress = state["progress"]
        self.step = int(state["step"])

    # -- folding ---------------------------------------------------------------------------------------------
    def fold_(self, force: bool = False) -> nn.Module:
        """Same as :func:`maxq.fold_` on this sparsifier's model."""
        from .fold import fold_

        return fold_(self.model, force=force)

    def _check_attached(self) -> None:
        if self.folded:
            raise RuntimeError("this Sparsifier's model was folded; its masks are gone")

    def _detach(self) -> None:
        """Forget the model (after folding)."""
        self._hook.remove()
        self._layers.clear()
        self.folded = True
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.workspace.clear()


def sparsifier_of(model: nn.Module) -> Sparsifier | None:
    """The :class:`Sparsifier` attached to ``model`` (its root module), or ``None``."""
    return getattr(model, _ATTR, None)


def _fusable(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _blocks_nonzero(mask: Tensor, m: int) -> Tensor:
    """Nonzeros per N:M block of a weight-shaped tensor, ``[G]``."""
    return (to_blocks(mask, m) != 0).sum(-1)


def sparsify_(model: nn.Module, config: NMConfig, filter_fn: FilterFn | None = None) -> Sparsifier:
    """Attach N:M masks to ``model`` in place and return the :class:`Sparsifier` that drives them.

    Args:
        model: any ``nn.Module`` (torchvision, timm, your own); its classes are not changed.
        config: :class:`MaxQConfig`, :class:`SRSTEConfig` or :class:`OneShotConfig`.
        filter_fn: ``(module, qualified_name) -> bool`` choosing layers; default: every eligible Conv2d/Linear
            except the first conv and the last classifier (SPEC §1).

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
    for c in choices:
        if not c.selected:
            log.info("maxq: %s stays dense: %s", c.name, c.reason)
    log.info("maxq: %s %d:%d on %d layer(s)", config.method, config.n, config.m, len(sparsifier.layers))
    return sparsifier
