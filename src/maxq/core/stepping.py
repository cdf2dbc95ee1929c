"""What happens around an optimizer step, in every training loop: the one owner.

``maxq train``, [`Sparsifier.hook_optimizer`][maxq.Sparsifier.hook_optimizer] and the Lightning and Hugging Face
callbacks all drive a [`Sparsifier`][maxq.Sparsifier] through an
[`OptimizerSteps`][maxq.core.stepping.OptimizerSteps]; none of them repeats its rules. The three moments, the
framework hook at each, and the call:

* **An optimizer step begins** (its first micro-batch): HF ``on_step_begin``; Lightning ``on_train_batch_start``;
  ``maxq train`` before the forward -> [`OptimizerSteps.begin_step`][maxq.core.stepping.OptimizerSteps.begin_step]
  (``done`` = optimizer steps completed so far).
* **The gradients are final** (after the last micro-batch): HF ``on_pre_optimizer_step``; Lightning
  ``on_before_optimizer_step``; an optimizer step pre-hook ->
  [`OptimizerSteps.before_optimizer_step`][maxq.core.stepping.OptimizerSteps.before_optimizer_step].
* **The optimizer stepped**: HF ``on_step_end``; Lightning ``on_train_batch_end`` when ``global_step`` moved; an
  optimizer step post-hook ->
  [`OptimizerSteps.after_optimizer_step`][maxq.core.stepping.OptimizerSteps.after_optimizer_step].

The rules:

* **Progress comes from a step counter**, never from an epoch hook: with ``steps_per_epoch`` the ramp's progress
  for optimizer step number ``done`` is ``done / steps_per_epoch`` epochs (the config floors it for the paper's
  once-per-epoch staircase). A run resumed from any checkpoint, mid-epoch included, therefore has the same
  progress, dense fraction and step count as the uninterrupted run from its first step on.
* **The decay sees true gradients**: with a ``GradScaler`` the gradients are unscaled first (once; the scaler's
  own ``step`` then does not unscale again), exactly as gradient clipping does.
* **Masks follow a step that really happened**: the mask update runs after the optimizer stepped; a step the
  AMP scaler skipped (inf/NaN gradients: the weights did not change) recomputes nothing, unless the ramp moved.
* **Once per optimizer step**: under gradient accumulation ``begin_step`` may be called for every micro-batch
  (it is idempotent) and the other two once per optimizer step.
* A per-step ramp (``MaxQConfig(per_step=True)``) moves after each step, so the masks of the next step are
  computed once; the staircase moves when the first step of an epoch begins, so an evaluation at the end of an
  epoch sees that epoch's masks.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .sparsifier import Sparsifier

__all__ = [
    "HookHandle",
    "OptimizerSteps",
    "check_manual_call",
    "check_steps_per_epoch",
    "torch_optimizer",
    "unscale_once",
]

log = logging.getLogger(__name__)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper.

    Unwraps accelerate's ``AcceleratedOptimizer`` (``.optimizer``, what the Hugging Face Trainer hands its
    callbacks) and Lightning's ``LightningOptimizer`` (``._optimizer``), as deep as they nest.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer and wraps none; the message says what to pass.
    """
    obj = optimizer
    for _ in range(8):  # wrappers nest (accelerate around Lightning around torch, ...); follow them down
        if isinstance(obj, torch.optim.Optimizer) and hasattr(obj, "_optimizer_step_pre_hooks"):
            inner = getattr(obj, "_optimizer", None)  # LightningOptimizer is also an instance of its optimizer's class
            if not isinstance(inner, torch.optim.Optimizer):
                return obj
        else:
            inner = getattr(obj, "_optimizer", None) or getattr(obj, "optimizer", None)
        if inner is None or inner is obj:
            break
        obj = inner
    raise TypeError(
        f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}, which wraps none that maxq can find. "
        "Pass the torch optimizer itself (accelerate: `optimizer.optimizer`; Lightning: `trainer.optimizers[0]`), "
        "or use maxq.integrations.lightning.MaxQCallback / maxq.integrations.hf.MaxQCallback"
    )


def check_steps_per_epoch(steps_per_epoch: int | None) -> int | None:
    """``steps_per_epoch`` (optimizer steps per epoch) as given, if it is ``None`` or a positive int.

    Raises:
        ValueError: anything else (a bool, a float, 0 or less).
    """
    if steps_per_epoch is not None and (
        isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
    ):
        raise ValueError(f"steps_per_epoch must be a positive int (optimizer steps per epoch), got {steps_per_epoch!r}")
    return steps_per_epoch


def unscale_once(scaler: Any, optimizer: Any) -> None:
    """Unscale ``optimizer``'s gradients with ``scaler`` (a ``torch.amp.GradScaler``) unless that already happened
    since the scaler's last ``update()``; a disabled scaler or ``None`` does nothing. No host synchronisation."""
    if scaler is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(torch_optimizer(optimizer))
    except RuntimeError as exc:
        if "already been called" not in str(exc):
            raise


#: sparsifier -> the OptimizerSteps whose optimizer hooks drive it (``hook_optimizer``); weak keys: a sparsifier
#: that goes away takes its entry with it.
_HOOKED: weakref.WeakKeyDictionary[Any, OptimizerSteps] = weakref.WeakKeyDictionary()


def check_manual_call(sparsifier: Sparsifier, call: str) -> None:
    """Refuse ``sparsifier.<call>()`` (``regularize_`` or ``step``) made outside the optimizer hooks that already
    make it ([`Sparsifier.hook_optimizer`][maxq.Sparsifier.hook_optimizer]): both would run, counting every step twice
    and doubling the decay.

    Raises:
        RuntimeError: the sparsifier's optimizer is hooked and the call does not come from the hooks.
    """
    driver = _HOOKED.get(sparsifier)
    if driver is None or driver._in_hook or not driver._hooked():
        return
    raise RuntimeError(
        f"Sparsifier.{call}() was called on a sparsifier whose optimizer is hooked (hook_optimizer): the hooks "
        f"already call regularize_() before and step() after every optimizer.step(), so this call would count the "
        f"step twice and double the decay. Drop the {call}() calls (a MaxQCallback makes them too: use the callback "
        "or the hooks, not both), or remove the hooks first (handle.remove() on the handles hook_optimizer "
        "returned) to drive the sparsifier by hand"
    )


class HookHandle:
    """A handle on the hooks [`Sparsifier.hook_optimizer`][maxq.Sparsifier.hook_optimizer] put on an optimizer:
    [`remove`][maxq.core.stepping.OptimizerSteps.remove] takes all of them off (as torch's ``RemovableHandle`` does for
    one hook), and so does leaving a ``with`` block."""

    def __init__(self, driver: OptimizerSteps) -> None:
        self._driver = driver

    def remove(self) -> None:
        self._driver.remove()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class OptimizerSteps:
    """Drives a [`Sparsifier`][maxq.Sparsifier] around the optimizer steps of any training loop.

    Args:
        sparsifier: the sparsifier to drive.
        steps_per_epoch: optimizer steps per epoch (after gradient accumulation). With it, the ramp's progress
            comes from the step counter passed to [`begin_step`][maxq.core.stepping.OptimizerSteps.begin_step] /
            [`after_optimizer_step`][maxq.core.stepping.OptimizerSteps.after_optimizer_step]; without it, progress is
            left to [`Sparsifier.set_progress`][maxq.Sparsifier.set_progress] calls of your own.
        eager: move a staircase ramp right after the step that ends an epoch (for loops with no hook before a
            step, such as [`Sparsifier.hook_optimizer`][maxq.Sparsifier.hook_optimizer]) instead of when the next step
            begins.

    Example (a loop of your own; ``done`` counts optimizer steps):

    ```python
    steps = OptimizerSteps(sparsifier, steps_per_epoch=len(loader))
    for x, y in loader:
        steps.begin_step(done)
        scaler.scale(loss_fn(model(x), y)).backward()
        steps.before_optimizer_step(optimizer, scaler)   # unscale once, SR-STE decay
        scaler.step(optimizer); scaler.update(); optimizer.zero_grad()
        done += 1
        steps.after_optimizer_step(done)                 # masks from the updated weights
    ```
    """

    def __init__(self, sparsifier: Sparsifier, *, steps_per_epoch: int | None = None, eager: bool = False) -> None:
        self.sparsifier = sparsifier
        self.steps_per_epoch = check_steps_per_epoch(steps_per_epoch)
        self.eager = eager
        self._stepped: bool | None = None  # set by watch()'s post-hook when the optimizer really steps
        self._watching = False
        self._handles: list[Any] = []
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None  # the optimizer hook() hooked
        self._in_hook = False  # a hook of hook() is running: its regularize_() / step() calls are the hooks' own

    # -- the three moments ---------------------------------------------------------------------------------------
    def progress(self, done: int) -> float | None:
        """Training progress in epochs of optimizer step number ``done`` (0-based), or ``None`` without
        ``steps_per_epoch``."""
        return None if self.steps_per_epoch is None else done / self.steps_per_epoch

    def last_progress(self, total_steps: int) -> float | None:
        """The ramp's progress (epochs) that the masks at the end of a run of ``total_steps`` optimizer steps
        follow: ``total_steps / steps_per_epoch`` where the ramp moves after each step (a per-step ramp, or
        ``eager``), else that of the last step's beginning, ``(total_steps - 1) / steps_per_epoch``. ``None``
        without ``steps_per_epoch``."""
        moves_after_a_step = self.eager or getattr(self.sparsifier.config, "per_step", False)
        return self.progress(int(total_steps) if moves_after_a_step else max(int(total_steps) - 1, 0))

    def begin_step(self, done: int) -> float:
        """An optimizer step begins (``done`` steps completed so far): the step counter and the ramp follow the
        counter. Idempotent: call it for every micro-batch if that is easier. Returns the dense fraction."""
        sp = self.sparsifier
        sp.steps = int(done)
        progress = self.progress(done)
        if progress is not None and sp.progress != progress:
            sp.set_progress(progress)
        self._stepped = None
        return sp.dense_fraction

    def before_optimizer_step(self, optimizer: Any = None, scaler: Any = None) -> None:
        """The gradients are final: unscale them once (``scaler``, if enabled) and add the SR-STE decay."""
        if scaler is not None and optimizer is not None:
            unscale_once(scaler, optimizer)
        self.sparsifier.regularize_()

    def after_optimizer_step(self, done: int | None = None, stepped: bool | None = None) -> bool:
        """The optimizer step ended; recompute the masks from the updated weights (every ``update_every`` steps).

        Args:
            done: optimizer steps completed, this one included (the framework's counter); default: the
                sparsifier's counter + 1.
            stepped: whether the weights really changed (``False``: the AMP scaler skipped the step); default:
                what [`watch`][maxq.core.stepping.OptimizerSteps.watch] saw, else ``True``.

        Returns:
            whether the masks were recomputed.
        """
        sp = self.sparsifier
        done = sp.steps + 1 if done is None else int(done)
        if stepped is None:  # what watch() saw; without watch() every call is a real step
            stepped = bool(self._stepped) if self._watching else True
        self._stepped = None
        progress = None
        if self.steps_per_epoch is not None and (self.eager or getattr(sp.config, "per_step", False)):
            progress = self.progress(done)
        if not stepped:  # the weights did not change: masks stay, unless the ramp moved
            sp.steps = done
            if progress is not None and progress != sp.progress:
                sp.set_progress(progress)
                return True
            return False
        sp.steps = done - 1
        return sp.step(progress)

    # -- automatic mode ------------------------------------------------------------------------------------------
    def watch(self, optimizer: Any) -> None:
        """Learn from ``optimizer`` (wrapped or not) whether each step really happened (a post-hook, no sync)."""
        opt = torch_optimizer(optimizer)
        self._handles.append(opt.register_step_post_hook(lambda o, args, kwargs: self._mark_stepped()))
        self._watching = True

    def hook(self, optimizer: Any) -> list[HookHandle]:
        """Make the calls around ``optimizer.step()`` automatic with step hooks (see
        [`Sparsifier.hook_optimizer`][maxq.Sparsifier.hook_optimizer]); returns the handles.

        Raises:
            RuntimeError: the sparsifier's optimizer is hooked already (by this or another ``OptimizerSteps``):
                two sets of hooks would count every step twice. Remove the first hooks before hooking again.
        """
        opt = torch_optimizer(optimizer)
        current = _HOOKED.get(self.sparsifier)
        if current is not None and current._hooked():
            other = current._optimizer() if current._optimizer is not None else None
            which = "this optimizer" if other is opt else f"another optimizer ({type(other).__name__})"
            raise RuntimeError(
                f"hook_optimizer was already called for this sparsifier, on {which}: its hooks already call "
                "regularize_() and step() around every optimizer.step(), and a second set would count every step "
                "twice and double the decay. Remove the first hooks (handle.remove() on the handles it returned) "
                "before hooking again"
            )

        def pre(o: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # args[0] is the optimizer itself; a closure comes positionally after it or as a keyword.
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if closure is None:
                with self._hook_call():
                    self.before_optimizer_step()
                return None

            # A closure computes the gradients inside step() (LBFGS, Lightning): decay right after it.
            def decayed() -> Any:
                loss = closure()
                with self._hook_call():
                    self.before_optimizer_step()
                return loss

            return (args[:1], {**{k: v for k, v in kwargs.items() if k != "closure"}, "closure": decayed})

        def post(o: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            with self._hook_call():
                self.after_optimizer_step()

        self._handles.extend([opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)])
        self._optimizer = weakref.ref(opt)
        _HOOKED[self.sparsifier] = self
        return [HookHandle(self), HookHandle(self)]  # one per hook, as before; either removes both

    @contextlib.contextmanager
    def _hook_call(self) -> Iterator[None]:
        self._in_hook = True
        try:
            yield
        finally:
            self._in_hook = False

    def _hooked(self) -> bool:
        """Whether hook()'s hooks are on an optimizer that still exists."""
        return self._optimizer is not None and self._optimizer() is not None

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watching = False
        self._optimizer = None
        if _HOOKED.get(self.sparsifier) is self:
            del _HOOKED[self.sparsifier]

    def _mark_stepped(self) -> None:
        self._stepped = True

    # -- what travels in a checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state (masks, step count, progress) for a framework's checkpoint."""
        return self.sparsifier.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsifier.load_state_dict(state)
