"""N:M sparse training inside the Hugging Face ``Trainer``: `MaxQCallback` (extra: ``pip install maxq[hf]``).

Pass the callback to the Trainer's constructor; nothing else in the training script changes:

```python
from maxq import MaxQConfig
from maxq.integrations.hf import MaxQCallback

callback = MaxQCallback(MaxQConfig(n=2, m=4, ramp=(0, 2)))
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
trainer.save_model("out")            # an ordinary model, exactly 2:4, that loads without maxq
```

What the callback does at each moment of the Trainer's loop (the rules are
[`OptimizerSteps`][maxq.core.stepping.OptimizerSteps]', not repeated here):

* ``on_init_end``: sparsify the model (or adopt the one you sparsified with ``maxq.sparsify_``), so a resume
  checkpoint's weights load into a sparsified model.
* ``on_train_begin``: steps per epoch from the Trainer's dataloader and gradient accumulation; check that the ramp
  finishes within ``state.max_steps``; on a resumed run, the sparsifier's state from the checkpoint folder.
* ``on_step_begin``: the ramp's progress from ``state.global_step`` (optimizer steps).
* ``on_pre_optimizer_step``: unscale the gradients once under fp16 AMP, SR-STE decay on true gradients.
* ``on_step_end``: masks from the updated weights, unless the AMP scaler skipped the step.
* ``on_epoch_end``: ``maxq/dense_fraction``, ``maxq/dense_blocks``, ``maxq/mean_soft_scale`` logged through
  ``Trainer.log`` (every reporting integration, ``state.log_history``).
* ``on_save``: the sparsifier's state (masks, step, progress) into the checkpoint folder (gathered whole under FSDP2, so
  one file, written by the saving process, resumes at any world size).
* ``on_train_end``: the per-layer report (``callback.report``); fold and check N:M (``fold=True``, the default;
  ``callback.result``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..calibrate import CalibrationConfig, CalibrationReport, calibrate_
from ..core.check import NMCheck
from ..core.config import NMConfig
from ..core.layers import FilterFn
from ..core.sharding import gathered
from ..core.sparsifier import Report, Sparsifier, sparsifier_of
from ..core.stepping import OptimizerSteps
from ._lifecycle import (
    adopt_or_sparsify,
    callback_calibration,
    callback_config,
    check_ramp_fits,
    check_sharding,
    epoch_steps,
    finish,
    ramp_metrics,
    save_folded,
)

__all__ = ["STATE_FILE", "MaxQCallback"]

log = logging.getLogger(__name__)

_SHARDING_HINT = (
    "With the Trainer's FSDP2 (accelerate), every weight is sharded on dim 0 and the placement cannot be chosen: "
    "for a model with HF Conv1D layers (GPT-2), shard it yourself before creating the Trainer, "
    "fully_shard(block, shard_placement_fn=...) per block and then the model (accelerate keeps a model that "
    "fully_shard already wrapped), or sparsify only nn.Linear layers (filter_fn)"
)

#: the file the callback adds to each of the Trainer's checkpoint folders
STATE_FILE = "maxq_sparsifier.pt"


class MaxQCallback(TrainerCallback):
    """Sparsify a model to N:M while the Hugging Face ``Trainer`` trains it.

    Args:
        config: the method (``maxq.MaxQConfig(n=2, m=4, ramp=(0, 2))``, ``SRSTEConfig``, ``OneShotConfig``);
            ``None`` adopts the sparsifier of a model you already sparsified with [`maxq.sparsify_`][maxq.sparsify_].
        filter_fn: which layers to sparsify (see [`maxq.select_layers`][maxq.select_layers]); default: maxq's layer
            choice.
        per_step: a smooth ramp that moves every optimizer step (``True``) or the paper's once-per-epoch
            staircase (``False``); default: the config's ``per_step``. Only for methods with a ramp (MaxQ).
        fold: at the end of training fold the masks into the weights and check N:M, so ``trainer.save_model``
            writes an ordinary model (default). ``False`` leaves the masks attached (to train on, or to inspect);
            ``trainer.save_model`` still writes an ordinary model: from the end of ``train()`` on, the model's
            ``state_dict()`` holds the folded weights ``W * Mask`` under their ordinary names.
        fold_force: fold even if the ramp has not finished (the blocks still dense are pruned; a warning says so).
        steps_per_epoch: optimizer steps per epoch, only where the Trainer cannot tell (an iterable dataset
            without a length). Default: the Trainer's own count, ``ceil(len(train_dataloader) /
            gradient_accumulation_steps)``.
        calibration: prune the trained model once before training, from ``calibration_data``: ``"wanda"``,
            ``"sparsegpt"`` (the pattern and layer selection of ``config``) or a
            [`maxq.CalibrationConfig`][maxq.CalibrationConfig]; see [`maxq.calibrate_`][maxq.calibrate_]. The
            config's method then starts from the calibrated weights (``OneShotConfig``: that mask, fixed).
        calibration_data: the calibration batches (a DataLoader or list of the model's input dicts).

    Raises:
        ValueError: an argument is invalid (the message says what to pass).

    The callback must be given to ``Trainer(callbacks=[...])``: it sparsifies the model when the Trainer is
    created, before ``trainer.train(resume_from_checkpoint=...)`` loads the checkpoint's weights (the weights of a
    sparsified model are stored as ``...parametrizations.weight.original``).
    """

    def __init__(
        self,
        config: NMConfig | None = None,
        *,
        filter_fn: FilterFn | None = None,
        per_step: bool | None = None,
        fold: bool = True,
        fold_force: bool = False,
        steps_per_epoch: int | None = None,
        calibration: str | CalibrationConfig | None = None,
        calibration_data: Iterable[Any] | None = None,
    ) -> None:
        config = callback_config(
            config, filter_fn=filter_fn, per_step=per_step, fold=fold, fold_force=fold_force,
            steps_per_epoch=steps_per_epoch,
        )  # fmt: skip
        self.calibration = callback_calibration(config, calibration, calibration_data)
        self.calibration_data = calibration_data
        #: what the calibration did (a [`CalibrationReport`][maxq.CalibrationReport]), once the Trainer exists
        self.calibration_report: CalibrationReport | None = None
        self.config = config
        self.filter_fn = filter_fn
        self.fold = fold
        self.fold_force = fold_force
        self.steps_per_epoch = steps_per_epoch
        self._sparsifier: Sparsifier | None = None
        self._driver: OptimizerSteps | None = None
        self._trainer: Trainer | None = None
        self._pending_logs: dict[str, float] | None = None
        self._save_folded: Any = None  # fold=False, after train(): the state-dict hook that saves the folded model
        self.result: NMCheck | None = None  #: the N:M check of the folded model (after train(), with ``fold``)
        self.report: Report | None = None  #: the per-layer report at the end of train() (also logged at INFO)

    @property
    def sparsifier(self) -> Sparsifier:
        """The [`Sparsifier`][maxq.Sparsifier] the callback drives (there once the Trainer is created)."""
        if self._sparsifier is None:
            raise RuntimeError("the callback has no model yet: pass it to Trainer(callbacks=[...])")
        return self._sparsifier

    @property
    def driver(self) -> OptimizerSteps | None:
        """The [`OptimizerSteps`][maxq.core.stepping.OptimizerSteps] in use during ``train()`` (``None`` outside it)."""
        return self._driver

    # -- start ---------------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None and self.calibration is not None and sparsifier_of(model) is None:
            # before sparsifying: the masks then start from the calibrated weights
            self.calibration_report = calibrate_(model, self.calibration_data, self.calibration, self.filter_fn)
        if model is not None:
            self._sparsifier = adopt_or_sparsify(model, self.config, self.filter_fn)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("the Trainer passed no model to MaxQCallback.on_train_begin")
        sp = self._sparsifier
        if sp is None or sp.folded or sp.model is not model or sparsifier_of(model) is not sp:
            # added with trainer.add_callback, a model_init that built a new model, or a second train()
            if state.global_step > 0:
                raise RuntimeError(
                    "MaxQCallback met the model only at train(), after the Trainer had loaded the resume "
                    "checkpoint's weights into an unsparsified model (their sparsified names did not match, so they "
                    "were dropped). Pass the callback to the constructor: Trainer(..., callbacks=[MaxQCallback(...)])"
                )
            sp = self._sparsifier = adopt_or_sparsify(model, self.config, self.filter_fn)
        if self._driver is not None:
            self._driver.remove()
        if self._save_folded is not None:  # training again: checkpoints hold the sparsified weights, for resuming
            self._save_folded.remove()
            self._save_folded = None
        check_sharding(sp, _SHARDING_HINT)  # accelerate's FSDP2 prepared the model before this event
        steps = self._steps_per_epoch(args, kwargs.get("train_dataloader"), sp)
        self._driver = OptimizerSteps(sp, steps_per_epoch=steps)
        plan = f"max_steps={args.max_steps}" if args.max_steps > 0 else f"num_train_epochs={args.num_train_epochs:g}"
        check_ramp_fits(self._driver, state.max_steps or None, plan, fold=self.fold, force=self.fold_force)
        if optimizer is not None:
            self._driver.watch(optimizer)  # the torch optimizer inside accelerate's wrapper: was a step skipped?
        frame_locals = _trainer_locals(self)
        self._trainer = frame_locals.get("self")
        if state.global_step > 0:
            self._restore(args, state, frame_locals.get("resume_from_checkpoint"))
        self._driver.begin_step(state.global_step)
        log.info(
            "maxq: %s %d:%d on %d layer(s), %s optimizer steps per epoch, starting at step %d (dense fraction %.3f)",
            sp.config.method,
            sp.config.n,
            sp.config.m,
            len(sp.layers),
            steps,
            state.global_step,
            sp.dense_fraction,
        )

    def _steps_per_epoch(self, args, dataloader, sp: Sparsifier) -> int | None:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        try:
            batches = len(dataloader) if dataloader is not None else None
        except TypeError:
            batches = None
        # the Trainer's num_update_steps_per_epoch (set_initial_training_values)
        return epoch_steps(batches, args.gradient_accumulation_steps, sp.config, "the Trainer")

    # -- around every optimizer step -------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        self._driver.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Without gradient clipping the Trainer has not unscaled fp16 gradients yet: unscale once (accelerate's
        # scaler.step then does not unscale again), so the decay is added to true gradients.
        self._driver.before_optimizer_step(optimizer, scaler=getattr(optimizer, "scaler", None))

    def on_step_end(self, args, state, control, **kwargs):
        self._driver.after_optimizer_step(state.global_step)

    # -- metrics ---------------------------------------------------------------------------------------------------
    def on_epoch_end(self, args, state, control, **kwargs):
        if self._sparsifier is None or self._sparsifier.folded:
            return
        metrics = ramp_metrics(self._sparsifier)  # reads the masks: once per epoch, not per step
        log.info("maxq: epoch %.2f %s", state.epoch or 0.0, {k: round(v, 4) for k, v in metrics.items()})
        if self._trainer is not None:
            # Trainer.log reaches every reporting integration and state.log_history; its handler clears
            # control.should_log, which the Trainer's own end-of-epoch log still needs.
            should_log = control.should_log
            self._trainer.log(dict(metrics))
            control.should_log = should_log
        else:  # a Trainer we could not find: ride on the next log event
            self._pending_logs = metrics
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            if state.log_history:
                state.log_history[-1].update(self._pending_logs)
            self._pending_logs = None

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if self._driver is None:
            return
        # Under FSDP2 the mask state is sharded (DTensors, each rank its rows): gathered whole on every rank (a
        # collective; the Trainer calls on_save on every process), then written by the process that saves, so the
        # file holds the whole state and resumes at any world size.
        saved = {"global_step": state.global_step, "sparsifier": gathered(self._driver.state_dict())}
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._trainer is not None and hasattr(self._trainer, "_get_output_dir"):
            folder = os.path.join(
                self._trainer._get_output_dir(trial=None), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            )
        if not os.path.isdir(folder):
            log.warning("maxq: checkpoint folder %s not found; the sparsifier's state is not saved with it", folder)
            return
        torch.save(saved, _state_path(folder))

    def _restore(self, args, state, folder: str | None) -> None:
        if not isinstance(folder, str):
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = _state_path(folder)
        sp = self._sparsifier
        if os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("global_step") != state.global_step:
                raise RuntimeError(
                    f"{path} was written at step {saved.get('global_step')}, the Trainer resumes at step "
                    f"{state.global_step}: the checkpoint folder is inconsistent"
                )
            self._driver.load_state_dict(saved["sparsifier"])
            log.info("maxq: sparsifier state restored from %s (step %d)", path, state.global_step)
            return
        exact = not sp.config.frozen and sp.config.update_every == 1
        message = (
            f"maxq: no sparsifier state in {folder}; step {state.global_step} and the ramp follow the Trainer's "
            "step counter, and the masks are recomputed from the loaded weights"
        )
        if exact:
            log.info("%s (exact for %s with update_every=1)", message, sp.config.method)
        else:
            log.warning(
                "%s: NOT the masks of the interrupted run (%s masks do not follow every step's weights)",
                message,
                "one-shot" if sp.config.frozen else f"update_every={sp.config.update_every}",
            )
        sp.steps = state.global_step

    # -- end -------------------------------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        if self._driver is not None:
            self._driver.remove()
            self._driver = None
        self._trainer = None
        sp = self._sparsifier
        if sp is not None and not sp.folded:
            self.report, self.result = finish(sp, fold=self.fold, force=self.fold_force)
            if not sp.folded:  # fold=False: the masks stay, but what saves the model writes an ordinary one
                self._save_folded = save_folded(sp)
                log.info(
                    "maxq: fold=False: the masks stay attached; the model's state_dict() (what trainer.save_model "
                    "and save_pretrained write) holds the folded weights W * Mask under their ordinary names"
                )


def _state_path(folder: str) -> str:
    return os.path.join(folder, STATE_FILE)


def _trainer_locals(callback: MaxQCallback) -> dict[str, Any]:
    """The locals of the ``Trainer`` method that fired the current event (its ``self``; in ``_inner_training_loop``
    also ``resume_from_checkpoint``). Callbacks are not handed the Trainer nor the checkpoint folder it resumes
    from; both are in the frame that called the callback handler. Empty if no such frame is found."""
    frame = sys._getframe(1)
    try:
        for _ in range(16):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and callback in getattr(owner.callback_handler, "callbacks", ()):
                return {k: frame.f_locals[k] for k in ("self", "resume_from_checkpoint") if k in frame.f_locals}
            frame = frame.f_back
        return {}
    finally:
        del frame
