"""OptimizerSteps: the one owner of what happens around an optimizer step (ramp from a counter, decay on true
gradients, masks after a real step, once per optimizer step), checked against plain references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import maxq
from maxq.core.reference import ref_sparsifier_masks
from maxq.core.stepping import OptimizerSteps, torch_optimizer, unscale_once

from ..nets import small_cnn

SPE = 4  # optimizer steps per epoch in these tests


def _data(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch ``micro`` of optimizer step ``step``: a pure function of both (any resume sees the same)."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def _state(sp: maxq.Sparsifier) -> tuple:
    masks = tuple(float(m.double().sum()) for _, m in sp.named_masks())
    return (sp.steps, sp.progress, sp.dense_fraction, masks)


def _run(model, sp, opt, steps: OptimizerSteps, start: int, stop: int, accumulate: int = 1) -> list[tuple]:
    """Optimizer steps ``start..stop-1`` of a loop with gradient accumulation; the sparsifier's state per step."""
    trace = []
    for done in range(start, stop):
        for micro in range(accumulate):
            steps.begin_step(done)  # every micro-batch: idempotent
            x, y = _data(done, micro)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        steps.before_optimizer_step(opt)
        opt.step()
        opt.zero_grad()
        steps.after_optimizer_step(done + 1)
        trace.append((done, *_state(sp)))
    return trace


def _setup(config: maxq.NMConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = small_cnn()
    sp = maxq.sparsify_(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, sp, opt


CONFIGS = [
    maxq.MaxQConfig(ramp=(0, 2)),  # staircase over two epochs
    maxq.MaxQConfig(ramp=(0.5, 2), per_step=True),
    maxq.SRSTEConfig(update_every=3),
    maxq.OneShotConfig(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{getattr(c, 'per_step', '')}")
@pytest.mark.parametrize("stop_at", [6, 8])  # mid-epoch (6 = epoch 1, step 2) and an epoch boundary
def test_resume_from_any_step_equals_the_uninterrupted_run(config, stop_at):
    model_a, sp_a, opt_a = _setup(config)
    whole = _run(model_a, sp_a, opt_a, OptimizerSteps(sp_a, steps_per_epoch=SPE), 0, 11)

    model, sp, opt = _setup(config)
    first = _run(model, sp, opt, OptimizerSteps(sp, steps_per_epoch=SPE), 0, stop_at)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    # A new process: another initialization, sparsified afresh, then the checkpoint loaded.
    model_b, sp_b, opt_b = _setup(config, seed=99)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    sp_b.load_state_dict(saved["sp"])
    rest = _run(model_b, sp_b, opt_b, OptimizerSteps(sp_b, steps_per_epoch=SPE), stop_at, 11)

    assert first + rest == whole  # progress, dense fraction, step count and masks at every step
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_progress_is_the_counter_over_steps_per_epoch_and_the_staircase_moves_when_a_step_begins():
    config = maxq.MaxQConfig(ramp=(0, 4))
    model, sp, opt = _setup(config)
    steps = OptimizerSteps(sp, steps_per_epoch=SPE)
    trace = _run(model, sp, opt, steps, 0, 2 * SPE)
    # After the last step of epoch 0 the staircase still holds epoch 0's fraction (an end-of-epoch evaluation
    # sees that epoch's masks); it moves when step SPE (epoch 1) begins.
    assert trace[SPE - 1][3] == config.dense_fraction(0) == 1.0
    assert steps.begin_step(SPE) == config.dense_fraction(1) == 0.75
    assert sp.progress == 1.0 and sp.steps == SPE
    # A mid-epoch start (resume) gets the fractional progress of its step, not the epoch's start.
    assert steps.begin_step(SPE + 2) == 0.75 and sp.progress == (SPE + 2) / SPE


def test_gradient_accumulation_counts_optimizer_steps_and_masks_follow_the_weights():
    config = maxq.MaxQConfig(ramp=(0, 1), per_step=True)
    model, sp, opt = _setup(config)
    steps = OptimizerSteps(sp, steps_per_epoch=SPE)
    for done in range(6):
        _run(model, sp, opt, steps, done, done + 1, accumulate=3)
        assert sp.steps == done + 1  # one count per optimizer step, not per micro-batch
        assert sp.progress == (done + 1) / SPE
        ref = ref_sparsifier_masks(sp)
        for name, mask in sp.named_masks():
            torch.testing.assert_close(mask, ref[name])


def test_the_decay_under_a_grad_scaler_equals_the_decay_on_unscaled_gradients():
    config = maxq.SRSTEConfig(decay_lambda=0.05)
    grads = []
    for scaled in (False, True):
        model, sp, opt = _setup(config)
        x, y = _data(0)
        loss = nn.functional.cross_entropy(model(x), y)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        scaler.scale(loss).backward()
        OptimizerSteps(sp).before_optimizer_step(opt, scaler)  # unscales first, then decays
        unscale_once(scaler, opt)  # a second unscale (e.g. the scaler's own step) must be a no-op
        grads.append([p.grad.clone() for p in model.parameters()])
    plain, amp = grads
    for a, b in zip(plain, amp):
        torch.testing.assert_close(a, b)
    # and the decay did act: the pruned weights' gradients differ from the bare backward's
    model, sp, opt = _setup(config)
    x, y = _data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    assert any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))


def test_a_step_the_scaler_skips_recomputes_nothing():
    config = maxq.SRSTEConfig()
    model, sp, opt = _setup(config)
    steps = OptimizerSteps(sp, steps_per_epoch=SPE)
    steps.watch(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = _data(0)
    steps.begin_step(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad[0].fill_(float("inf"))  # the scaler skips this step
    before = {k: v.clone() for k, v in sp.named_masks()}
    with torch.no_grad():  # if the masks were recomputed, they would change
        for name in sp.layers:
            dict(model.named_modules())[name].parametrizations.weight.original.mul_(-1.0).add_(0.3)
    steps.before_optimizer_step(opt, scaler)
    scaler.step(opt)
    scaler.update()
    assert steps.after_optimizer_step(1) is False
    assert sp.steps == 1
    assert all(torch.equal(before[k], v) for k, v in sp.named_masks())
    # a real step afterwards does recompute
    opt.zero_grad()
    steps.begin_step(1)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    steps.before_optimizer_step(opt, scaler)
    scaler.step(opt)
    scaler.update()
    assert steps.after_optimizer_step(2) is True


class _Wrapper:
    """A framework-style wrapper holding the torch optimizer as ``.optimizer`` (accelerate's convention)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self):
        self.optimizer.zero_grad()


def _hooked_vs_explicit(make_wrapper, use_closure: bool = False):
    results = []
    for auto in (True, False):
        model, sp, opt = _setup(maxq.MaxQConfig(ramp=(0, 1), per_step=True))
        wrapped = make_wrapper(opt)
        if auto:
            sp.hook_optimizer(wrapped, steps_per_epoch=SPE)
        for done in range(6):
            x, y = _data(done)
            if not auto:
                sp.set_progress(done / SPE)
            if use_closure:

                def closure(x=x, y=y, wrapped=wrapped, model=model):
                    wrapped.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                if not auto:
                    closure()
                    sp.regularize_()
                    opt.step()
                else:
                    wrapped.step(closure)
            else:
                wrapped.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if not auto:
                    sp.regularize_()
                wrapped.step()
            if not auto:
                sp.step((done + 1) / SPE)
        results.append((model.state_dict(), _state(sp)))
    (wa, sa), (wb, sb) = results
    assert sa == sb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_hook_optimizer_on_a_wrapped_optimizer_equals_explicit_calls():
    _hooked_vs_explicit(_Wrapper)


def test_hook_optimizer_decays_after_a_closure_computes_the_gradients():
    _hooked_vs_explicit(lambda opt: opt, use_closure=True)


def test_hook_optimizer_on_accelerates_optimizer():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = accelerate.Accelerator(cpu=True)
    try:
        wrap = accelerator.prepare_optimizer
        assert isinstance(wrap(torch.optim.SGD(small_cnn().parameters(), lr=0.1)), AcceleratedOptimizer)
        _hooked_vs_explicit(wrap)
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_torch_optimizer_unwraps_or_says_what_to_pass():
    opt = torch.optim.SGD(small_cnn().parameters(), lr=0.1)
    assert torch_optimizer(opt) is opt
    assert torch_optimizer(_Wrapper(_Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="Pass the torch optimizer itself"):
        torch_optimizer(object())
    _, sp, _ = _setup(maxq.SRSTEConfig())
    with pytest.raises(TypeError, match=r"accelerate: `optimizer\.optimizer`"):
        sp.hook_optimizer("not an optimizer")


def test_steps_per_epoch_is_validated():
    _, sp, _ = _setup(maxq.SRSTEConfig())
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps_per_epoch"):
            OptimizerSteps(sp, steps_per_epoch=bad)


def _one_step(model, opt, *, manual: tuple[str, ...] = (), sp=None) -> None:
    x, y = _data(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if "regularize_" in manual:
        sp.regularize_()
    opt.step()
    if "step" in manual:
        sp.step()


def test_hook_optimizer_twice_is_refused_and_counts_once():
    # Issue 27: a second hook_optimizer doubled the step count and the decay, silently.
    model, sp, opt = _setup(maxq.SRSTEConfig())
    handles = sp.hook_optimizer(opt)
    with pytest.raises(RuntimeError, match=r"already called for this sparsifier, on this optimizer.*handle\.remove"):
        sp.hook_optimizer(opt)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"on another optimizer \(SGD\)"):
        sp.hook_optimizer(other)
    _one_step(model, opt)
    assert sp.steps == 1  # one set of hooks ran
    handles[0].remove()  # either handle takes both hooks off
    _one_step(model, opt)
    assert sp.steps == 1
    handles[1].remove()  # a second remove is a no-op
    with sp.hook_optimizer(other)[0]:  # hooking again after removing: fine; a handle is a context manager too
        _one_step(model, other)
    assert sp.steps == 2
    # An optimizer that is gone holds no hooks: a new one may be hooked without removing anything.
    sp.hook_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    import gc

    gc.collect()
    sp.hook_optimizer(opt)
    _one_step(model, opt)
    assert sp.steps == 3


@pytest.mark.parametrize("call", ["regularize_", "step"])
def test_manual_calls_on_a_hooked_sparsifier_are_refused(call):
    # Issue 27: hook_optimizer plus hand-written regularize_() / step() decayed and counted every step twice.
    model, sp, opt = _setup(maxq.SRSTEConfig())
    handles = sp.hook_optimizer(opt)
    with pytest.raises(
        RuntimeError, match=rf"Sparsifier\.{call}\(\) was called on a sparsifier whose optimizer is hooked"
    ):
        _one_step(model, opt, manual=(call,), sp=sp)
    sp.set_progress(1.0)  # the ramp stays explicit: allowed
    for handle in handles:
        handle.remove()
    _one_step(model, opt, manual=("regularize_", "step"), sp=sp)  # by hand once the hooks are off
    # The hooked optimizer step counted once (when it got that far), the refused call not at all, the manual one once.
    assert sp.steps == 1 + (call == "step")


def test_a_callback_driver_on_a_hooked_sparsifier_is_refused():
    # What the framework callbacks and maxq train do (an OptimizerSteps without hooks) next to hook_optimizer.
    _, sp, opt = _setup(maxq.SRSTEConfig())
    sp.hook_optimizer(opt)
    driver = OptimizerSteps(sp, steps_per_epoch=SPE)
    with pytest.raises(RuntimeError, match="use the callback or the hooks, not both"):
        driver.before_optimizer_step(opt)
