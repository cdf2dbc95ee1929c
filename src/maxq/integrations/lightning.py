"""N:M sparse training inside PyTorch Lightning: `MaxQCallback`.

Install with ``pip install maxq[lightning]``. Usage:

```python
import lightning.pytorch as L
import maxq
from maxq.integrations.lightning import MaxQCallback

callback = MaxQCallback(maxq.MaxQConfig(n=2, m=4, ramp=(0, 5)))
trainer = L.Trainer(max_epochs=10, callbacks=[callback])
trainer.fit(module, train_loader)      # sparsify, ramp, decay, masks; fold + check at the end
torch.save(module.state_dict(), "model.pt")   # an ordinary model: loads without maxq
```

What happens around every optimizer step is [`OptimizerSteps`][maxq.core.stepping.OptimizerSteps]' job (the one
owner of those rules); this callback only tells it when, with Lightning's own counters:

* ``setup(stage="fit")``: sparsify the module (or adopt the sparsifier of a model you sparsified with
  [`maxq.sparsify_`][maxq.sparsify_]); before Lightning restores ``ckpt_path=``, so the checkpoint's
  parametrized weights load into it.
* ``load_state_dict``: restore the sparsifier (masks, step count, progress) from the checkpoint.
* ``on_train_start``: steps per epoch = ``ceil(num_training_batches / accumulate_grad_batches)`` (how Lightning
  counts optimizer steps, last partial accumulation included); check that the ramp finishes within the planned
  steps; watch the optimizer; ``begin_step(global_step)``.
* ``on_train_batch_start``: ``begin_step(global_step)`` (idempotent under gradient accumulation).
* ``on_before_optimizer_step``: ``before_optimizer_step``: unscale once (Lightning's AMP plugin already did) and
  the SR-STE decay on the true gradients.
* ``on_train_batch_end``: ``after_optimizer_step(global_step)`` when ``global_step`` moved: the masks follow the
  weights of a step that really happened (a step the AMP scaler skipped recomputes nothing).
* ``on_train_epoch_end``: log ``maxq/dense_fraction``, ``maxq/dense_blocks``, ``maxq/mean_soft_scale``.
* ``on_save_checkpoint``: the layout record (``checkpoint["maxq_layout"]``), so ``maxq verify`` reads the file.
* ``state_dict`` / ``load_state_dict``: the sparsifier's state in the checkpoint's ``callbacks`` entry (whole tensors
  under FSDP2: see `state_dict`).
* ``on_train_end``: fold, check N:M, the per-layer report (after the last checkpoint of the run; a
  ``trainer.save_checkpoint`` afterwards holds the folded model).

Since the ramp's progress is ``global_step / steps_per_epoch``, a run resumed from any checkpoint (mid-epoch
included) has the uninterrupted run's progress, dense fraction, step count and masks from its first step on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from ..core.check import NMCheck
from ..core.config import NMConfig
from ..core.fold import nm_layout
from ..core.layers import FilterFn
from ..core.sharding import gathered
from ..core.sparsifier import Report, Sparsifier, sparsifier_of
from ..core.stepping import OptimizerSteps
from ._lifecycle import (
    adopt_or_sparsify,
    callback_config,
    check_ramp_fits,
    check_sharding,
    epoch_steps,
    finish,
    ramp_metrics,
)

__all__ = ["MaxQCallback"]

log = logging.getLogger(__name__)

_SHARDING_HINT = "With ModelParallelStrategy, pass that shard_placement_fn to fully_shard in configure_model"


class MaxQCallback(pl.Callback):
    """Train a LightningModule N:M sparse (MaxQ, SR-STE or one-shot) and hand back an ordinary N:M model.

    Args:
        config: the method ([`maxq.MaxQConfig`][maxq.MaxQConfig], [`maxq.SRSTEConfig`][maxq.SRSTEConfig],
            [`maxq.OneShotConfig`][maxq.OneShotConfig]). ``None``: adopt the sparsifier of a model you already
            sparsified with [`maxq.sparsify_`][maxq.sparsify_].
        filter_fn: ``(module, qualified_name) -> bool`` choosing the layers (names relative to ``module``);
            default: every eligible Conv2d/Linear except the first conv and the last classifier.
        per_step: ``True``: a smooth ramp moved every optimizer step; ``False``: the paper's once-per-epoch
            staircase; ``None``: as the config says. Only for a config with a ramp
            ([`maxq.MaxQConfig`][maxq.MaxQConfig]).
        fold: at the end of training fold the masks into the weights, check that every sparsified layer is exactly
            N:M and log the per-layer report; the module is then an ordinary model. ``False``: report only.
        fold_force: fold even if training ended before the ramp did (the remaining dense blocks are pruned).
        module: attribute path of the submodule to sparsify (``"model"``, ``"backbone.encoder"``); default: the
            whole LightningModule.
        steps_per_epoch: optimizer steps per epoch, for loaders Lightning cannot count (iterable datasets without
            ``__len__``); default: ``ceil(num_training_batches / accumulate_grad_batches)``.
        log_metrics: log the ramp's dense fraction, share of dense blocks and mean soft scale at every epoch end
            through ``pl_module.log_dict`` (to the trainer's logger).

    Raises:
        ValueError: an argument is invalid (the message says what to pass instead).

    The [`Sparsifier`][maxq.Sparsifier] it drives is `sparsifier` (``None`` before ``trainer.fit`` set it up).
    Only one optimizer is supported. Manual optimization works when ``training_step`` steps the optimizer once
    per batch through ``self.optimizers()`` (Lightning then counts ``global_step`` and calls
    ``on_before_optimizer_step``); pass ``steps_per_epoch`` if it steps another number of times per epoch.
    """

    def __init__(
        self,
        config: NMConfig | None = None,
        *,
        filter_fn: FilterFn | None = None,
        per_step: bool | None = None,
        fold: bool = True,
        fold_force: bool = False,
        module: str | None = None,
        steps_per_epoch: int | None = None,
        log_metrics: bool = True,
    ) -> None:
        config = callback_config(
            config, filter_fn=filter_fn, per_step=per_step, fold=fold, fold_force=fold_force,
            steps_per_epoch=steps_per_epoch,
        )  # fmt: skip
        if not isinstance(log_metrics, bool):
            raise ValueError(f"log_metrics must be True or False, got {log_metrics!r}")
        if module is not None and (not isinstance(module, str) or not module.strip(".")):
            raise ValueError(f"module must be an attribute path such as 'model' or 'backbone.encoder', got {module!r}")
        self.config = config
        self.filter_fn = filter_fn
        self.fold = fold
        self.fold_force = fold_force
        self.module = module
        self.steps_per_epoch = steps_per_epoch
        self.log_metrics = log_metrics
        self.result: NMCheck | None = None  #: the N:M check of the folded model (after fit, with ``fold``)
        self.report: Report | None = None  #: the per-layer report at the end of fit (also logged at INFO)
        self._sparsifier: Sparsifier | None = None
        self._driver: OptimizerSteps | None = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's state that came before setup
        self._begun: int | None = None  # global_step when the current optimizer step began

    @property
    def sparsifier(self) -> Sparsifier | None:
        """The [`Sparsifier`][maxq.Sparsifier] this callback drives (``None`` before ``trainer.fit`` sets it up)."""
        return self._sparsifier

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    # -- setup: sparsify before Lightning restores a checkpoint ---------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or (self._sparsifier is not None and not self._sparsifier.folded):
            return
        target = self._target(pl_module)
        self._refuse_whole_module_over_a_sparsified_part(pl_module, target)
        with _quiet_unless_rank_zero(trainer):
            self._sparsifier = adopt_or_sparsify(target, self.config, self.filter_fn)
        cfg = self._sparsifier.config
        rank_zero_info(
            f"maxq: {cfg.method} {cfg.n}:{cfg.m} on {len(self._sparsifier.layers)} layer(s) of "
            f"{self.module or type(pl_module).__name__}"
        )
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def _refuse_whole_module_over_a_sparsified_part(self, pl_module: pl.LightningModule, target: nn.Module) -> None:
        """A submodule sparsified by hand (``maxq.sparsify_(module.model, ...)``) while the callback targets the
        whole LightningModule: say which ``module=`` adopts it, instead of a confusing "already parametrized" or
        "not sparsified" error."""
        if self.module is not None or sparsifier_of(target) is not None:
            return
        inner = [name for name, sub in pl_module.named_modules() if name and sparsifier_of(sub) is not None]
        if inner:
            raise ValueError(
                f"MaxQCallback: {type(pl_module).__name__}.{inner[0]} was sparsified with maxq.sparsify_, and the "
                f"callback works on the whole LightningModule (module=None): pass MaxQCallback(module={inner[0]!r}) "
                "to adopt that sparsifier (with config=None, or the config it was sparsified with)"
            )

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            target = pl_module.get_submodule(self.module)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(
                f"MaxQCallback(module={self.module!r}): {type(pl_module).__name__} has no submodule at that path; "
                f"its children are {children} (pass one of them, a dotted path below one, or module=None)"
            ) from None
        return target

    # -- the training run -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sp = self._require()
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"MaxQCallback supports exactly one optimizer, configure_optimizers gave {len(optimizers)}; "
                "put every parameter group into one optimizer"
            )
        check_sharding(sp, _SHARDING_HINT)  # configure_model sharded the module before this event
        steps = self.steps_per_epoch or self._count_steps(trainer)
        self._driver = OptimizerSteps(sp, steps_per_epoch=steps)
        check_ramp_fits(self._driver, *self._planned_steps(trainer, steps), fold=self.fold, force=self.fold_force)
        self._driver.watch(optimizers[0])
        self._begun = trainer.global_step
        self._driver.begin_step(trainer.global_step)
        rank_zero_info(
            f"maxq: {steps} optimizer step(s) per epoch, starting at step {trainer.global_step} "
            f"(dense fraction {sp.dense_fraction:.3f})"
        )

    @staticmethod
    def _planned_steps(trainer: pl.Trainer, steps_per_epoch: int | None) -> tuple[float | None, str]:
        """Optimizer steps the fit is planned to take (``None``: unknown), and what says so."""
        max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        total = trainer.estimated_stepping_batches  # the smaller limit; inf without one, -1 for an unsized loader
        if not 0 < total < float("inf"):
            by_epochs = max_epochs * steps_per_epoch if max_epochs and steps_per_epoch else None
            total = min(x for x in (max_steps, by_epochs, float("inf")) if x is not None)
        if max_steps is not None and total == max_steps:
            return total, f"max_steps={max_steps}"
        return total, f"max_epochs={trainer.max_epochs}"

    def _count_steps(self, trainer: pl.Trainer) -> int | None:
        return epoch_steps(
            trainer.num_training_batches, trainer.accumulate_grad_batches, self._require().config, "Lightning"
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._driver is not None:
            self._begun = trainer.global_step
            self._driver.begin_step(trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._driver is not None:
            scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
            self._driver.before_optimizer_step(optimizer, scaler)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._driver is not None and trainer.global_step != self._begun:
            self._driver.after_optimizer_step(trainer.global_step)
            self._begun = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sp = self._sparsifier
        if self.log_metrics and sp is not None and not sp.folded:
            pl_module.log_dict(ramp_metrics(sp), on_step=False, on_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver is not None:
            self._driver.remove()
            self._driver = None
        sp = self._sparsifier
        if sp is None or sp.folded:
            return
        with _quiet_unless_rank_zero(trainer):
            self.report, self.result = finish(sp, fold=self.fold, force=self.fold_force)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._driver is not None:
            self._driver.remove()
            self._driver = None

    # -- the checkpoint -------------------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The layout record (which layers are N:M, with their state-dict names) goes into the checkpoint, so
        ``maxq verify`` needs no ``--nm`` for it, mid-fit (weights unfolded on the fly) or after."""
        layout = nm_layout(pl_module)
        if layout is not None:
            checkpoint["maxq_layout"] = layout.to_dict()

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state (masks, step count, progress) for Lightning's checkpoint; empty before setup and
        after folding (the folded model needs none).

        A model sharded with FSDP2 (``ModelParallelStrategy``) holds its mask state as DTensors, each rank its rows;
        they are gathered whole here (a collective: Lightning asks every rank), because Lightning writes the
        callbacks' state with ``torch.save`` from rank 0 alone (beside the DCP files of the weights), where a
        DTensor would keep only rank 0's rows. The state is the mask state's size (1/32 of the sparsified weights'
        fp32 bytes per bit plane), and whole it resumes at any world size."""
        sp = self._sparsifier
        if sp is None or sp.folded:
            return {}
        return gathered(sp.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore [`state_dict`][maxq.integrations.lightning.MaxQCallback.state_dict] (Lightning calls it after
        ``setup`` and after loading the weights)."""
        if not state_dict:
            return
        if self._sparsifier is None or self._sparsifier.folded:
            self._pending = state_dict
            return
        self._sparsifier.load_state_dict(state_dict)

    def _require(self) -> Sparsifier:
        if self._sparsifier is None or self._sparsifier.folded:
            raise RuntimeError("MaxQCallback was not set up for fitting (its setup(stage='fit') did not run)")
        return self._sparsifier


@contextlib.contextmanager
def _quiet_unless_rank_zero(trainer: pl.Trainer) -> Iterator[None]:
    """maxq's own info messages only from global rank 0 (every rank does the work)."""
    logger = logging.getLogger("maxq")
    if trainer.global_rank == 0:
        yield
        return
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
