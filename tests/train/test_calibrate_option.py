"""``maxq train --init RUN --calibrate {wanda,sparsegpt}``: the trained model is pruned from training batches
before the first step, the sparsifier keeps exactly those survivors (one-shot: fixed), and a resumed run does not
calibrate again."""

import pytest
import torch

import maxq.train.loop as loop
from maxq.cli import main
from maxq.train.recipe import TrainConfig

from ..conftest import one_thread
from .test_finetune import _cfg, _stop_after_first


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent") / "dense"
    with one_thread():
        loop.train(_cfg(out, method="dense"))
    return str(out / "checkpoint.pt")


@pytest.fixture
def calibrations(monkeypatch):
    """Every calibration the loop runs: its report and the pruned layers' survivors right after it."""
    seen = []
    original = loop.calibrate_

    def spy(model, batches, config, **kw):
        report = original(model, batches, config, **kw)
        survivors = {r.name: model.get_submodule(r.name).weight.detach() != 0 for r in report.pruned}
        seen.append((report, survivors, len(batches), config))
        return report

    monkeypatch.setattr(loop, "calibrate_", spy)
    return seen


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_oneshot_after_calibration_keeps_the_calibrated_mask(parent, calibrations, tmp_path, method):
    with one_thread():
        report = loop.train(_cfg(tmp_path / "run", method="oneshot", init=parent, calibrate=method,
                                 calibration_batches=3))  # fmt: skip
    ((calibration, survivors, batches, config),) = calibrations
    assert batches == 3 and (config.method, config.n, config.m) == (method, 2, 4)
    assert report["calibration"]["method"] == method and report["calibration"]["samples"] == 3 * 64
    assert [r["name"] for r in report["calibration"]["layers"] if not r["skipped"]] == report["sparse_layers"]
    assert report["nm_ok"]
    folded = torch.load(tmp_path / "run" / "model_folded.pt", weights_only=True)["state_dict"]
    kept_zeros = {r.name: r.kept_zeros for r in calibration.pruned}
    for name, kept in survivors.items():
        now = folded[f"{name}.weight"] != 0  # trained, with the mask fixed
        # blocks of m = 4 input channels at each kernel position, as [O, kh, kw, I / 4, 4]
        before, after = (t.permute(0, 2, 3, 1).reshape(*t.shape[:1], *t.shape[2:], -1, 4) for t in (kept, now))
        exact = before.sum(-1) == 2  # blocks without a kept zero: the calibrated survivors, trained
        assert torch.equal(after[exact], before[exact]), name
        assert int((~exact).sum()) <= kept_zeros[name]  # the tie case only (dead inputs: SparseGPT zeroes them)


def test_calibrated_start_differs_from_magnitude_and_resume_does_not_recalibrate(parent, calibrations, tmp_path):
    with one_thread():
        magnitude = loop.train(_cfg(tmp_path / "magnitude", method="oneshot", init=parent))
        options = dict(method="srste", init=parent, calibrate="sparsegpt", calibration_batches=2, epochs=2)
        with pytest.raises(KeyboardInterrupt):
            loop.train(_cfg(tmp_path / "run", **options), on_epoch_end=_stop_after_first)
        resumed = loop.train(_cfg(tmp_path / "run", resume=True, **options))
    assert len(calibrations) == 1  # the resumed run starts from its checkpoint's (calibrated, trained) weights
    assert resumed["calibration"]["batches"] == 2
    assert resumed["before_finetune"]["test_loss"] != magnitude["before_finetune"]["test_loss"]


def test_cli_flags_and_errors(parent, calibrations, tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress"]
    with one_thread():
        assert main([*args, "--init", parent, "--method", "oneshot", "--calibrate", "wanda",
                     "--calibration-batches", "1", "--out", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert len(calibrations) == 1 and calibrations[0][2] == 1
    with pytest.raises(ValueError, match="--init"):
        TrainConfig(method="oneshot", calibrate="wanda")
    with pytest.raises(ValueError, match="N:M --method"):
        TrainConfig(method="dense", calibrate="wanda", init="x.pt")
    with pytest.raises(ValueError, match="--calibrate must be one of"):
        TrainConfig(method="oneshot", calibrate="obs", init="x.pt")
    assert main([*args, "--calibrate", "wanda", "--out", str(tmp_path / "bad")]) == 2
    assert "--init" in capsys.readouterr().err
