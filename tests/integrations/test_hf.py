"""maxq.integrations.hf.MaxQCallback in the real Hugging Face Trainer (tiny BERT from a config, offline, CPU)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerControl, TrainerState

import maxq
from maxq.integrations.hf import STATE_FILE, MaxQCallback

from .. import torchrun
from .hf_setup import Recorder, WordsDataset, make_trainer, tiny_bert, training_args, weights

HERE = Path(__file__).resolve().parent
# One xdist worker runs this file: the uninterrupted run the resume tests compare with is a module fixture.
pytestmark = pytest.mark.xdist_group("hf")
ROOT = HERE.parents[1]


def MAXQ(**kw) -> maxq.MaxQConfig:
    return maxq.MaxQConfig(**{"n": 2, "m": 4, "ramp": (0, 2), **kw})


@pytest.fixture(scope="module", autouse=True)
def _eager_masks():
    # The callback does not depend on the fused CPU kernels (tests/engine covers them, same masks); without them
    # these tests never wait for a kernel build.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAXQ_CPU_KERNELS", "0")
        yield


# -- the constructor says what to do --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": "maxq"}, "maxq config such as"),
        ({"config": maxq.SRSTEConfig(n=2, m=4), "per_step": True}, "methods with a ramp"),
        ({"per_step": True}, "per_step needs a config"),
        ({"config": maxq.MaxQConfig(), "steps_per_epoch": 0}, "positive int"),
        ({"config": maxq.MaxQConfig(), "fold": False, "fold_force": True}, "needs fold=True"),
        ({"config": maxq.MaxQConfig(), "filter_fn": 3}, "callable"),
    ],
)
def test_constructor_validates(kwargs, match):
    config = kwargs.pop("config", None)
    with pytest.raises(ValueError, match=match):
        MaxQCallback(config, **kwargs)


def test_per_step_overrides_the_config():
    assert MaxQCallback(MAXQ(), per_step=True).config.per_step is True
    with pytest.raises(RuntimeError, match="Trainer\\(callbacks"):
        MaxQCallback(MAXQ()).sparsifier  # noqa: B018


# -- end to end: exact N:M, metrics, a saved model that loads without maxq ------------------------------------------
@pytest.mark.parametrize(
    "config",
    [MAXQ(), maxq.SRSTEConfig(n=2, m=4), maxq.OneShotConfig(n=2, m=4)],
    ids=["maxq", "srste", "oneshot"],
)
def test_ends_exactly_2_4(config, tmp_path):
    callback = MaxQCallback(config)
    trainer = make_trainer(str(tmp_path), [callback], n=32, save_strategy="no")
    layers = callback.sparsifier.layers
    assert layers and sparsifier_attached(trainer.model)
    trainer.train()
    assert callback.sparsifier.folded and not sparsifier_attached(trainer.model)
    assert maxq.check_nm(trainer.model, 2, 4, layers).ok
    logged = [row for row in trainer.state.log_history if "maxq/dense_fraction" in row]
    assert [row["epoch"] for row in logged] == [1.0, 2.0, 3.0]
    assert any("loss" in row for row in trainer.state.log_history)  # the Trainer's own epoch logs still happen
    if config.method == "maxq":
        assert [row["maxq/dense_fraction"] for row in logged] == [1.0, 0.5, 0.0]
        assert all(row["maxq/mean_soft_scale"] >= 1.0 for row in logged)


def sparsifier_attached(model) -> bool:
    from maxq.core.sparsifier import sparsifier_of

    return sparsifier_of(model) is not None


def test_save_pretrained_after_fold_loads_without_maxq(tmp_path):
    callback = MaxQCallback(MAXQ(ramp=(0, 1)))
    trainer = make_trainer(str(tmp_path / "run"), [callback], n=32, num_train_epochs=2, save_strategy="no")
    layers = callback.sparsifier.layers
    trainer.train()
    folder = tmp_path / "model"
    trainer.save_model(str(folder))
    ids = WordsDataset(4, seed=3).ids
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"with torch.no_grad(): torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(k == 'maxq' or k.startswith('maxq.') for k in sys.modules), 'maxq imported'\n"
    )
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert maxq.check_nm(reloaded, 2, 4, layers).ok
    assert callback.result.ok and [r.name for r in callback.report.sparsified] == layers  # as Lightning's


def test_fold_false_then_save_model_writes_an_ordinary_model(tmp_path):
    # Issue 27: with fold=False, save_model wrote ...parametrizations.weight.original keys, which from_pretrained
    # reported missing and initialised at random, silently.
    from transformers import AutoModelForSequenceClassification

    callback = MaxQCallback(MAXQ(ramp=(0, 1)), fold=False)
    trainer = make_trainer(str(tmp_path / "run"), [callback], n=32, num_train_epochs=2, save_strategy="no")
    layers = callback.sparsifier.layers
    trainer.train()
    sp = callback.sparsifier
    assert not sp.folded and sparsifier_attached(trainer.model)  # the masks stay, as asked
    assert callback.result is None and [r.name for r in callback.report.sparsified] == layers
    ids = WordsDataset(4, seed=3).ids
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    trainer.save_model(str(tmp_path / "model"))
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "model"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)
    assert maxq.check_nm(reloaded, 2, 4, layers).ok
    # The sparsified model takes that ordinary state dict back: the weights become its trainable ones (renamed on
    # load) and the masks are recomputed from them.
    trainer.model.load_state_dict(reloaded.state_dict())
    for name in layers:
        loaded = trainer.model.get_submodule(name).parametrizations.weight.original
        assert torch.equal(loaded, reloaded.get_submodule(name).weight)


def test_a_ramp_that_cannot_finish_is_refused_when_training_starts(tmp_path):
    # Issue 27: refused only in on_train_end, after all the training, though num_train_epochs was known at the start.
    callback = MaxQCallback(MAXQ())  # the staircase 0-2 over 2 epochs: p = 0.5 in the last one
    trainer = make_trainer(str(tmp_path), [callback], n=32, num_train_epochs=2, save_strategy="no")
    before = weights(trainer.model)
    message = (
        r"ramp 0-2 \(per-epoch staircase.*\) does not finish within the planned 8 optimizer steps "
        r"\(num_train_epochs=2: 2 epochs of 4 steps\): 50% .*end the ramp by epoch 1 \(ramp=\(0, 1\)\).*fold_force"
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in weights(trainer.model).items())  # no step was taken
    trainer = make_trainer(str(tmp_path), [MaxQCallback(MAXQ(per_step=True))], n=32, max_steps=6, save_strategy="no")
    with pytest.raises(ValueError, match=r"planned 6 optimizer steps \(max_steps=6: 1\.5 epochs of 4 steps\)"):
        trainer.train()


def test_ramp_check_without_a_planned_length_warns(caplog):
    from maxq.core.stepping import OptimizerSteps
    from maxq.integrations._lifecycle import check_ramp_fits

    sp = maxq.sparsify_(tiny_bert(), MAXQ())
    driver = OptimizerSteps(sp, steps_per_epoch=4)
    for total in (None, float("inf")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="maxq"):
            check_ramp_fits(driver, total, "max_epochs=-1", fold=True, force=False)
        assert "the run's length is not set (max_epochs=-1)" in caplog.text and "refuses to fold" in caplog.text
    with caplog.at_level(logging.WARNING, logger="maxq"):
        caplog.clear()
        check_ramp_fits(driver, 12, "max_epochs=3", fold=True, force=False)  # 3 staircase epochs: p = 0 in the last
    assert not caplog.text


# -- resume mid-epoch: the uninterrupted run's sparsifier state, step by step, and its weights bit for bit -----------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """3 epochs of 8 optimizer steps, checkpoints every 5 steps (mid-epoch), the ramp over epochs 0-2."""
    out = tmp_path_factory.mktemp("uninterrupted")
    callback = MaxQCallback(MAXQ())
    recorder = Recorder(callback)
    trainer = make_trainer(str(out), [callback, recorder])
    trainer.train()
    return out, recorder.rows, weights(trainer.model)


def resumed(out: Path, checkpoint: Path) -> tuple[dict, dict]:
    callback = MaxQCallback(MAXQ())
    recorder = Recorder(callback)
    trainer = make_trainer(str(out), [callback, recorder])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return recorder.rows, weights(trainer.model)


def assert_same_run(rows, final, reference_rows, reference_final, first_step):
    assert min(rows) == first_step + 0.5, "the resumed run starts at the checkpoint's step"
    for key in sorted(rows):
        assert rows[key] == reference_rows[key], f"step {key}: (progress, dense fraction, steps, masks) differ"
    assert final.keys() == reference_final.keys()
    for key in final:
        assert torch.equal(final[key], reference_final[key]), f"final {key} differs from the uninterrupted run"


def test_dense_trainer_resumes_bit_exactly(tmp_path):
    # The premise of the next test, measured: the Trainer alone (no maxq) resumes mid-epoch bit for bit on CPU.
    def run(out, resume=None):
        trainer = make_trainer(str(out), n=32)  # 3 epochs of 4 steps
        trainer.train(resume_from_checkpoint=resume)
        return weights(trainer.model)

    full = run(tmp_path / "a")
    again = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-5"))  # epoch 1, step 1 of 4
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_resume_mid_epoch_equals_uninterrupted(uninterrupted, tmp_path):
    out, rows, final = uninterrupted
    checkpoint = out / "checkpoint-10"  # epoch 1, step 2 of 8: mid-epoch, the ramp at its middle step
    assert (checkpoint / STATE_FILE).is_file()
    assert set(rows) == {k + 0.5 for k in range(24)} | set(range(1, 25))
    assert rows[10.5][:3] == (1.25, 0.5, 10) and rows[24][:3] == (2.875, 0.0, 24)
    got_rows, got_final = resumed(tmp_path, checkpoint)
    assert_same_run(got_rows, got_final, rows, final, first_step=10)


def test_resume_without_the_state_file_recomputes_the_same_masks(uninterrupted, tmp_path, caplog):
    # MaxQ's masks follow the weights every step, so the loaded weights give them back exactly.
    out, rows, final = uninterrupted
    checkpoint = tmp_path / "checkpoint-15"
    shutil.copytree(out / "checkpoint-15", checkpoint)
    (checkpoint / STATE_FILE).unlink()
    with caplog.at_level("INFO", logger="maxq.integrations.hf"):
        got_rows, got_final = resumed(tmp_path / "run", checkpoint)
    assert "masks are recomputed from the loaded weights" in caplog.text
    assert_same_run(got_rows, got_final, rows, final, first_step=15)


def test_resume_restores_masks_the_weights_cannot_give_back(tmp_path, caplog):
    # update_every=3: at step 5 the masks are step 3's, not those of step 5's weights; only the state file has them.
    def run(out, resume=None):
        callback = MaxQCallback(maxq.SRSTEConfig(n=2, m=4, update_every=3))
        recorder = Recorder(callback)
        trainer = make_trainer(str(out), [callback, recorder], n=32, num_train_epochs=2)
        trainer.train(resume_from_checkpoint=resume)
        return recorder.rows, weights(trainer.model)

    rows, final = run(tmp_path / "a")
    got_rows, got_final = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-5"))
    assert_same_run(got_rows, got_final, rows, final, first_step=5)
    (tmp_path / "a" / "checkpoint-5" / STATE_FILE).unlink()
    with caplog.at_level("WARNING", logger="maxq.integrations.hf"):
        run(tmp_path / "c", resume=str(tmp_path / "a" / "checkpoint-5"))
    assert "NOT the masks of the interrupted run" in caplog.text


def test_callback_added_after_init_cannot_resume(uninterrupted, tmp_path):
    out, _, _ = uninterrupted
    trainer = make_trainer(str(tmp_path))
    trainer.add_callback(MaxQCallback(MAXQ()))
    with pytest.raises(RuntimeError, match="callbacks=\\[MaxQCallback"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-5"))


# -- gradient accumulation ------------------------------------------------------------------------------------------
def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # 64 samples, batches of 8, 2 micro-batches per step: 4 optimizer steps per epoch, 8 in all.
    # A per-step ramp: a step counted per micro-batch would move it between the micro-batches of one step.
    callback = MaxQCallback(MAXQ(ramp=(0, 1)), per_step=True)
    recorder = Recorder(callback)
    trainer = make_trainer(str(tmp_path), [callback, recorder], num_train_epochs=2, gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.state.global_step == 8
    assert sorted(k for k in recorder.rows if k == int(k)) == list(range(1, 9))
    for step in range(8):
        progress, _, steps, _ = recorder.rows[step + 0.5]
        assert (progress, steps) == (step / 4, step)
        assert recorder.rows[step + 0.25] == recorder.rows[step + 0.5], "the state moved within a step"
    assert len({recorder.rows[step + 0.5][1] for step in range(8)}) > 2  # the ramp moved step by step
    assert recorder.rows[8][2] == 8 and callback.sparsifier.folded


# -- AMP: the decay sees true gradients; a skipped step changes nothing ---------------------------------------------
def accelerated_sgd(model, scale: float):
    from accelerate import Accelerator

    Accelerator(cpu=True)  # the process state AcceleratedOptimizer reads (the Trainer's is the same)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    return AcceleratedOptimizer(sgd, device_placement=False, scaler=scaler)


def linear_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))


def callback_on(model, config) -> MaxQCallback:
    callback = MaxQCallback(config)
    callback.on_init_end(training_args("/tmp/unused"), TrainerState(), TrainerControl(), model=model)
    return callback


def test_decay_under_grad_scaler_equals_decay_on_true_gradients():
    config = maxq.SRSTEConfig(n=2, m=4, decay_lambda=0.1)
    x = torch.randn(5, 16)
    # reference: plain SGD, the decay added to unscaled gradients
    ref = linear_model()
    ref_sp = callback_on(ref, config).sparsifier
    ref(x).square().sum().backward()
    ref_sp.regularize_()
    expected_grads = [p.grad.clone() for p in ref.parameters()]
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    # the Trainer's case: accelerate's optimizer with a GradScaler, scaled gradients, no clipping before the hook
    model = linear_model()
    callback = callback_on(model, config)
    args, state, control = training_args("/tmp/unused"), TrainerState(), TrainerControl()  # resets accelerate
    optimizer = accelerated_sgd(model, scale=1024.0)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    callback.on_step_begin(args, state, control)
    optimizer.scaler.scale(model(x).square().sum()).backward()
    callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    optimizer.step()  # the scaler must not unscale a second time
    assert not optimizer.step_was_skipped
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    state.global_step = 1
    callback.on_step_end(args, state, control)
    assert callback.sparsifier.steps == 1


def test_skipped_amp_step_recomputes_nothing(monkeypatch):
    model = linear_model()
    callback = callback_on(model, maxq.SRSTEConfig(n=2, m=4))
    args, state, control = training_args("/tmp/unused"), TrainerState(), TrainerControl()  # resets accelerate
    optimizer = accelerated_sgd(model, scale=1024.0)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    before = {k: v.clone() for k, v in callback.sparsifier.named_masks()}
    updates = []
    monkeypatch.setattr(callback.sparsifier, "update_masks", lambda: updates.append(1))
    callback.on_step_begin(args, state, control)
    optimizer.scaler.scale(model(torch.randn(3, 16)).sum() * float("inf")).backward()
    callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
    optimizer.step()
    assert optimizer.step_was_skipped
    state.global_step = 1  # the Trainer counts the skipped step
    callback.on_step_end(args, state, control)
    assert updates == [] and callback.sparsifier.steps == 1
    assert all(torch.equal(m, before[k]) for k, m in callback.sparsifier.named_masks())


def test_hook_optimizer_accepts_accelerated_optimizer():
    model = linear_model()
    sp = maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4))
    optimizer = accelerated_sgd(model, scale=8.0)
    handles = sp.hook_optimizer(optimizer)
    optimizer.scaler.scale(model(torch.randn(3, 16)).square().sum()).backward()
    optimizer.step()
    assert sp.steps == 1 and len(handles) == 2
    optimizer.scaler.scale(model(torch.randn(3, 16)).sum() * float("inf")).backward()
    optimizer.step()  # skipped by the scaler: not counted
    assert optimizer.step_was_skipped and sp.steps == 1


# -- adopting a model the user sparsified ---------------------------------------------------------------------------
def test_adopts_a_presparsified_model(tmp_path):
    model = tiny_bert()
    own = maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4))
    callback = MaxQCallback()
    from transformers import Trainer

    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), num_train_epochs=1, save_strategy="no"),
        train_dataset=WordsDataset(16),
        callbacks=[callback],
    )
    assert callback.sparsifier is own
    layers = own.layers
    trainer.train()
    assert own.folded and maxq.check_nm(model, 2, 4, layers).ok
    with pytest.raises(ValueError, match="already sparsified"):
        other = tiny_bert()
        maxq.sparsify_(other, maxq.SRSTEConfig(n=2, m=4))
        Trainer(model=other, args=training_args(str(tmp_path)), callbacks=[MaxQCallback(MAXQ())])


# -- distributed: torchrun, 2 CPU processes (gloo) ------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_identical_masks_and_weights(tmp_path):
    src = str(ROOT / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = tmp_path / "out"
    run = torchrun.run([str(HERE / "hf_setup.py"), str(out), str(tmp_path / "rank")], env=env, clean=[out])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}", weights_only=True) for i in (0, 1))
    assert r0["steps"] == r1["steps"] == 2 * 8  # 64 samples, 4 per process and step, 2 processes: 8 steps/epoch
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
