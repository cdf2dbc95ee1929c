"""MaxQCallback inside real PyTorch Lightning (CPU): exact N:M at the end, exact resume, accumulation, AMP, DDP."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

import maxq  # noqa: E402
from maxq.integrations.lightning import MaxQCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPE = 8  # batches (= optimizer steps without accumulation) per epoch


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers, loggers, ...
        yield


class Loader:
    """A resumable in-memory loader (Lightning's ``state_dict``/``load_state_dict`` protocol), so that Lightning
    resumes a dense run bit-exactly mid-epoch (a plain DataLoader restarts the epoch's data; see the tutorial)."""

    def __init__(self, batches: int = SPE, size: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batches * size, 16, generator=gen)
        self.y = torch.randint(0, 4, (batches * size,), generator=gen)
        self.size, self.start, self.pos = size, 0, 0

    def __len__(self) -> int:
        return len(self.x) // self.size

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self)):
            self.pos = i + 1
            yield self.x[i * self.size : (i + 1) * self.size], self.y[i * self.size : (i + 1) * self.size]
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["pos"] % len(self)


class Stream(torch.utils.data.IterableDataset):
    """Batches of an iterable dataset without a length: Lightning cannot count the steps of an epoch."""

    def __iter__(self):
        yield from Loader()


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.9, optimizers: int = 1, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))  # fmt: skip
        self.lr, self.momentum, self.n_optimizers = lr, momentum, optimizers
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        make = lambda: torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)  # noqa: E731
        return make() if self.n_optimizers == 1 else [make() for _ in range(self.n_optimizers)]


def checksum(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().numpy().tobytes())


class Recorder(L.Callback):
    """Per optimizer step (after MaxQCallback's hook): Lightning's counter and the sparsifier's state."""

    def __init__(self, maxq_cb: MaxQCallback) -> None:
        self.cb, self.rows, self._last = maxq_cb, [], None

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last:
            return
        self._last, sp = trainer.global_step, self.cb.sparsifier
        masks = tuple(checksum(m) for _, m in sp.named_masks())
        self.rows.append((trainer.global_step, sp.progress, sp.dense_fraction, sp.steps, masks))


def trainer(callbacks, epochs=2, **kw) -> L.Trainer:
    options = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)  # fmt: skip
    options.update(kw)
    return L.Trainer(**options)


def weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# -- the end: exactly N:M, an ordinary model -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [maxq.MaxQConfig(ramp=(0, 1), per_step=True), maxq.SRSTEConfig(), maxq.OneShotConfig()],
    ids=["maxq", "srste", "oneshot"],
)
def test_ends_exactly_2_4_as_an_ordinary_model(config, tmp_path):
    L.seed_everything(0, verbose=False)
    model = Net()
    cb = MaxQCallback(config, module="net")
    trainer([cb]).fit(model, Loader())
    assert cb.result is not None and cb.result.ok
    layers = ["0", "3"]  # net.5, the classifier, stays dense by default
    assert [r.name for r in cb.report.sparsified] == layers  # the end-of-training report, without a log handler
    assert maxq.check_nm(model.net, 2, 4, layers).ok
    assert cb.sparsifier.folded and not any("parametrizations" in k for k in model.state_dict())
    torch.save(model.net.state_dict(), tmp_path / "net.pt")
    fresh = Net().net
    fresh.load_state_dict(torch.load(tmp_path / "net.pt"))  # strict: an ordinary model, no maxq needed
    assert maxq.check_nm(fresh, 2, 4, layers).ok


def test_ramp_metrics_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0, verbose=False)
    cb = MaxQCallback(maxq.MaxQConfig(ramp=(0, 2)), fold=False)  # staircase: p = 1, 0.5 at epochs 0, 1
    trainer([cb], logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1).fit(Net(), Loader())
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    head = lines[0].split(",")
    rows = [dict(zip(head, line.split(","))) for line in lines[1:]]
    fractions = [float(r["maxq/dense_fraction"]) for r in rows if r.get("maxq/dense_fraction")]
    assert fractions == [1.0, 0.5]
    scales = [float(r["maxq/mean_soft_scale"]) for r in rows if r.get("maxq/mean_soft_scale")]
    assert len(scales) == 2 and all(s > 1.0 for s in scales)  # MaxQ's soft mask: kept weights scaled up


# -- resume: the uninterrupted run's state, step by step -----------------------------------------------------------
@pytest.mark.parametrize("per_step", [False, True], ids=["staircase", "per_step"])
def test_resume_mid_epoch_matches_the_uninterrupted_run(per_step, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # update_every=2 and a checkpoint at an odd step: the saved masks are older than the weights, so only a restored
    # sparisifier state (not masks recomputed from the loaded weights) continues exactly.
    config = maxq.MaxQConfig(ramp=(0, 2), per_step=per_step, update_every=2)

    def run(ckpt=None, save=False):
        L.seed_everything(0, verbose=False)
        model, cb = Net(), MaxQCallback(config, fold=False)
        rec = Recorder(cb)
        callbacks = [cb, rec]
        if save:
            callbacks.append(ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1))
        trainer(callbacks, epochs=3, enable_checkpointing=save).fit(model, Loader(), ckpt_path=ckpt)
        return rec.rows, weights(model), cb.sparsifier.state_dict()

    ref_rows, ref_weights, ref_state = run(save=True)
    assert [r[0] for r in ref_rows] == list(range(1, 3 * SPE + 1))
    assert ref_rows[-1][2] == 0.0 and ref_rows[SPE][2] < 1.0  # the ramp ran
    for step in (11, 2 * SPE):  # mid-epoch (odd: masks older than the weights), epoch boundary
        rows, final, state = run(ckpt=tmp_path / f"step={step}.ckpt")
        assert rows == ref_rows[step:], f"resumed at step {step}"
        assert torch.equal(final, ref_weights)  # Lightning resumes this dense run bit-exactly, so must maxq
        assert state["step"] == ref_state["step"] and state["progress"] == ref_state["progress"]
        assert all(torch.equal(state["layers"][k]["mask"], v["mask"]) for k, v in ref_state["layers"].items())


def test_checkpoint_carries_the_sparsifier(tmp_path):
    L.seed_everything(0, verbose=False)
    cb = MaxQCallback(maxq.MaxQConfig(ramp=(0, 2)), fold=False)
    t = trainer([cb], epochs=1)
    t.fit(Net(), Loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"][cb.state_key]
    # progress is the last step's (set when it began: step SPE - 1 of SPE per epoch)
    assert saved["step"] == SPE and saved["progress"] == (SPE - 1) / SPE
    assert set(saved["layers"]) == set(cb.sparsifier.layers)


def test_maxq_verify_reads_checkpoints_written_during_fit(tmp_path, capsys):
    # Issue 27: a .ckpt written during a MaxQCallback fit (weights not folded yet) could not be verified.
    from lightning.pytorch.callbacks import ModelCheckpoint

    from maxq.cli import main

    L.seed_everything(0, verbose=False)
    cb = MaxQCallback(maxq.MaxQConfig(ramp=(0, 1), per_step=True), module="net")
    saver = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=4, save_top_k=-1)
    trainer([cb, saver], enable_checkpointing=True).fit(Net(), Loader())
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "step=4.ckpt")]) == 1  # mid-ramp: blocks still dense
    out = capsys.readouterr().out
    assert "written during fit, not folded" in out and "ramp unfinished" in out
    assert main(["verify", str(tmp_path / "step=8.ckpt")]) == 0  # the ramp's end; no --nm: the record says
    out = capsys.readouterr().out
    assert "lightning file's layout" in out and "OK: 2/2 expected layers are 2:4" in out


# -- gradient accumulation: optimizer steps, not micro-batches ------------------------------------------------------
def test_accumulation_counts_optimizer_steps():
    L.seed_everything(0, verbose=False)
    batches = 7  # odd: Lightning steps on the last, partial accumulation too -> ceil(7 / 2) = 4 steps per epoch
    model = Net()
    cb = MaxQCallback(maxq.MaxQConfig(ramp=(0, 2), per_step=True), fold=False)
    rec = Recorder(cb)
    stepped = []
    t = trainer([cb, rec], accumulate_grad_batches=2)

    class Count(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(lambda *a: stepped.append(1))

    t.callbacks.append(Count())
    t.fit(model, Loader(batches=batches))
    assert len(stepped) == t.global_step == 2 * 4 == cb.sparsifier.steps
    assert [r[0] for r in rec.rows] == list(range(1, 9))
    for done, progress, fraction, steps, _ in rec.rows:
        assert steps == done and progress == done / 4
        assert fraction == maxq.MaxQConfig(ramp=(0, 2), per_step=True).dense_fraction(done / 4)


def test_manual_optimization_counts_the_users_steps():
    L.seed_everything(0, verbose=False)
    cb = MaxQCallback(maxq.SRSTEConfig())
    t = trainer([cb])
    t.fit(Net(manual=True), Loader())
    assert t.global_step == cb.sparsifier.steps == 2 * SPE and cb.result.ok


# -- AMP: the decay sees the true gradients, skipped steps change nothing --------------------------------------------
def test_decay_under_a_grad_scaler_uses_unscaled_gradients():
    from lightning.pytorch.plugins import MixedPrecision

    L.seed_everything(0, verbose=False)
    lam, lr = 0.1, 0.05
    cb = MaxQCallback(maxq.SRSTEConfig(decay_lambda=lam), fold=False)

    class Check(L.Callback):  # listed after MaxQCallback: sees the gradients the optimizer will use
        rows: ClassVar[list] = []

        def on_after_backward(self, trainer, pl_module):  # scaled gradients, before Lightning unscales
            self.scale = trainer.strategy.precision_plugin.scaler.get_scale()
            self.scaled = {n: p.grad.clone() for n, p in pl_module.named_parameters()}
            if trainer.global_step == 3:  # the scaler skips this step
                pl_module.net[3].parametrizations.weight.original.grad[0, 0] = float("inf")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sp = cb.sparsifier
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.masks = {n: m.clone() for n, m in sp.named_masks()}
            for name, layer in sp._layers.items():
                key = f"net.{name.split('.')[-1]}.parametrizations.weight.original"
                grad, weight = layer.weight.grad, layer.weight.detach()
                true = self.scaled[key] / self.scale
                expected = true + lam * weight * (self.masks[name] == 0)
                if trainer.global_step != 3:
                    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
                self.rows.append((trainer.global_step, name, float(grad.abs().max())))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = {n: p.detach() for n, p in pl_module.named_parameters()}
            masks = dict(cb.sparsifier.named_masks())
            if trainer.global_step == 4:  # the skipped step: no weight moved, no mask was recomputed
                assert all(torch.equal(after[n], self.before[n]) for n in after)
                assert all(torch.equal(masks[n], self.masks[n]) for n in masks)
            else:  # plain SGD: the step used exactly the decayed true gradient
                for n, p in pl_module.named_parameters():
                    torch.testing.assert_close(after[n], self.before[n] - lr * p.grad, rtol=1e-6, atol=1e-7)

    check = Check()
    t = trainer([cb, check], epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    t.fit(Net(lr=lr, momentum=0.0), Loader())
    assert check.scale > 1.0  # a real scaler
    assert len(check.rows) == 2 * SPE and cb.sparsifier.steps == t.global_step == SPE


# -- adopting a sparsified model; errors ---------------------------------------------------------------------------
def test_adopts_a_model_the_user_sparsified():
    L.seed_everything(0, verbose=False)
    model = Net()
    sp = maxq.sparsify_(model.net, maxq.SRSTEConfig())
    cb = MaxQCallback(module="net")
    trainer([cb], epochs=1).fit(model, Loader())
    assert cb.sparsifier is sp and sp.steps == SPE and cb.result.ok

    model = Net()
    maxq.sparsify_(model.net, maxq.SRSTEConfig())
    with pytest.raises(ValueError, match="already sparsified with"):
        trainer([MaxQCallback(maxq.OneShotConfig(), module="net")], epochs=1).fit(model, Loader())
    # Issue 27: without module=, the errors ("not sparsified", "already has a parametrization") did not say it.
    for config in (None, maxq.SRSTEConfig()):
        with pytest.raises(
            ValueError, match=r"Net\.net was sparsified with maxq\.sparsify_.*MaxQCallback\(module='net'\)"
        ):
            trainer([MaxQCallback(config)], epochs=1).fit(model, Loader())


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"only maxq\.MaxQConfig"):
        MaxQCallback(maxq.SRSTEConfig(), per_step=True)
    with pytest.raises(ValueError, match="per_step needs a config"):
        MaxQCallback(per_step=True)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MaxQCallback(maxq.SRSTEConfig(), steps_per_epoch=0)
    with pytest.raises(ValueError, match="maxq config"):
        MaxQCallback("maxq")
    assert MaxQCallback(maxq.MaxQConfig(), per_step=True).config.per_step
    with pytest.raises(ValueError, match=r"no submodule at that path; its children are \['net'\]"):
        trainer([MaxQCallback(maxq.SRSTEConfig(), module="backbone")]).fit(Net(), Loader())
    with pytest.raises(ValueError, match=r"pass MaxQCallback\(steps_per_epoch=\.\.\.\)"):
        trainer([MaxQCallback(maxq.MaxQConfig())]).fit(Net(), Stream())
    cb = MaxQCallback(maxq.MaxQConfig(ramp=(0, 1), per_step=True), steps_per_epoch=SPE)
    trainer([cb]).fit(Net(), Stream())  # a loader without a length: the ramp follows the steps given
    assert cb.result.ok and cb.sparsifier.steps == 2 * SPE
    with pytest.raises(ValueError, match="exactly one optimizer"):
        trainer([MaxQCallback(maxq.SRSTEConfig())]).fit(Net(optimizers=2, manual=True), Loader())


def test_a_ramp_that_cannot_finish_is_refused_when_training_starts(caplog):
    # Issue 27: refused only in on_train_end, after all the training, though max_epochs was known at the start.
    model = Net()
    t = trainer([MaxQCallback(maxq.MaxQConfig(ramp=(0, 2)))], epochs=2)  # staircase: p = 0.5 in the last epoch
    message = (
        r"the ramp 0-2 \(per-epoch staircase.*\) does not finish within the planned 16 optimizer steps "
        r"\(max_epochs=2: 2 epochs of 8 steps\): 50% of the blocks would still be dense when training ends\. "
        r"To finish it in training, end the ramp by epoch 1 \(ramp=\(0, 1\)\), ramp per step \(per_step=True: "
        r"ends by epoch 2\), or train longer.*fold_force=True"
    )
    with pytest.raises(ValueError, match=message):
        t.fit(model, Loader())
    assert t.global_step == 0 and not any(p.grad is not None for p in model.parameters())  # before any step
    with pytest.raises(ValueError, match=r"planned 12 optimizer steps \(max_steps=12: 1\.5 epochs"):
        trainer([MaxQCallback(maxq.MaxQConfig(ramp=(0, 2), per_step=True))], max_steps=12).fit(Net(), Loader())
    # Where the end would not refuse, a warning says what happens to the blocks still dense.
    for options, consequence in (({"fold_force": True}, "pruned when folding"), ({"fold": False}, "not N:M")):
        caplog.clear()
        cb = MaxQCallback(maxq.MaxQConfig(ramp=(0, 2)), **options)
        with caplog.at_level(logging.WARNING, logger="maxq"):
            trainer([cb], epochs=2).fit(Net(), Loader())
        assert "does not finish within the planned 16 optimizer steps" in caplog.text and consequence in caplog.text
        assert cb.sparsifier.steps == 2 * SPE


# -- the example: real data, one process and 2-process DDP (gloo) ---------------------------------------------------
EXAMPLE = ROOT / "examples" / "lightning_fashion_mnist.py"


def run_example(tmp_path, *flags, timeout=300):
    from maxq.train.data import FMNIST_DIR

    if (
        not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
        and not (FMNIST_DIR / "train-images-idx3-ubyte").is_file()
    ):
        pytest.skip(f"Fashion-MNIST is not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    with socket.socket() as s:  # a free port for the DDP rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}  # fmt: skip
    cmd = [sys.executable, str(EXAMPLE), "--quick", "--threads", "1", "--out", str(tmp_path / "out"), *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK: 6/6 expected layers are 2:4" in run.stdout and "test top-1" in run.stdout, run.stdout
    return run


def test_example_quick(tmp_path):
    run_example(tmp_path)
    assert (tmp_path / "out" / "model.pt").is_file() and (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_masks_and_weights(tmp_path):
    run_example(tmp_path, "--devices", "2", "--strategy", "ddp", "--dump", str(tmp_path / "dump"))
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["masks"] and set(ranks[0]["masks"]) == set(ranks[1]["masks"])
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
