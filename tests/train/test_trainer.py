"""End-to-end ``maxq train`` runs on the synthetic set: files, exact resume, safety, torchrun DDP."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import maxq
from maxq.train.checkpoint import CheckpointError, load_folded
from maxq.train.loop import RunExists, lr_factor, train
from maxq.train.recipe import TrainConfig

FILES = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "report.json", "curves.png", "model_folded.pt"}


def _cfg(out, **kw):
    base = dict(
        dataset="synthetic", model="cnn_small", epochs=1, batch_size=64, out=str(out), progress=False, threads=2
    )
    base.update(kw)
    return TrainConfig(**base)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", ["maxq", "srste", "oneshot", "dense"])
def test_one_epoch_run_writes_every_file(method, tmp_path):
    # A one-epoch MaxQ run needs the smooth ramp to become N:M within the epoch (the staircase would keep it dense).
    report = train(_cfg(tmp_path / method, method=method, per_step=method == "maxq"))
    out = tmp_path / method
    assert {p.name for p in out.iterdir()} >= FILES
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    for key in ("train_loss", "test_top1", "test_top5", "lr", "dense_fraction", "epoch_time_s"):
        assert key in record
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["top1_last"] == report["top1_last"]
    assert 0 <= report["top1_last"] <= 100 and report["top1_best"] >= report["top1_last"]
    assert report["epochs"] == 1 and report["method"] == method and (report["n"], report["m"]) == (2, 4)
    assert report["top1_folded"] == pytest.approx(report["top1_last"])  # folding changes nothing
    model, _ = load_folded(out / "model_folded.pt")
    if method == "dense":
        assert report["nm_ok"] is None and report["params_nonzero"] == report["params_total"]
    else:
        assert report["nm_ok"] is True
        assert report["params_nonzero"] < report["params_total"]
        assert maxq.check_nm(model, 2, 4).ok
    assert (out / "curves.png").stat().st_size > 10_000


def test_resume_after_a_crash_is_exact(tmp_path):
    straight = train(_cfg(tmp_path / "a", epochs=3))

    class Crash(Exception):
        pass

    def crash_after_first(epoch, record, sparsifier):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        train(_cfg(tmp_path / "b", epochs=3), on_epoch_end=crash_after_first)
    assert not (tmp_path / "b" / "report.json").exists()
    resumed = train(_cfg(tmp_path / "b", epochs=3, resume=True))
    a = torch.load(tmp_path / "a" / "model_folded.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "model_folded.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["top1_last"] == straight["top1_last"]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_refuses_to_overwrite_a_run(tmp_path):
    train(_cfg(tmp_path / "r"))
    before = _digest(tmp_path / "r")
    with pytest.raises(RunExists, match="--resume"):
        train(_cfg(tmp_path / "r"))
    assert _digest(tmp_path / "r") == before


def test_bad_checkpoints_fail_and_leave_the_folder_untouched(tmp_path):
    out = tmp_path / "r"
    train(_cfg(out, epochs=2), on_epoch_end=None)
    before = _digest(out)
    with pytest.raises(CheckpointError, match="nm"):  # mismatched: asked for another pattern
        train(_cfg(out, epochs=2, resume=True, nm="1:4"), given={"nm", "resume"})
    assert _digest(out) == before
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    before = _digest(out)
    with pytest.raises(CheckpointError, match="truncated"):
        train(_cfg(out, epochs=3, resume=True))
    assert _digest(out) == before
    torch.save({"format": "something/else"}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"not a maxq\.checkpoint"):
        train(_cfg(out, epochs=3, resume=True))


def test_oneshot_from_a_dense_checkpoint(tmp_path):
    train(_cfg(tmp_path / "dense", method="dense"))
    report = train(_cfg(tmp_path / "one", method="oneshot", init=str(tmp_path / "dense" / "checkpoint.pt")))
    assert report["nm_ok"]
    with pytest.raises(CheckpointError, match="holds masks"):
        train(_cfg(tmp_path / "two", method="oneshot", init=str(tmp_path / "one" / "checkpoint.pt")))


def test_lr_schedule_is_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0) == pytest.approx(0.0)


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "maxq", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "r"
    args = [
        "--dataset",
        "synthetic",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    proc = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.pt").exists()
    done = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    if done == 6:
        pytest.skip("the run finished before it could be killed")
    assert not list(out.glob(".checkpoint.pt.*"))  # no temp file left behind... or a stale one never replaces
    proc = _cli(*args, "--resume")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert f"resuming {out} at epoch {done}" in output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "report.json").read_text())["epochs"] == 6


def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--master_port=29517", str(worker), str(out), str(dump)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for epoch in (1, 2):
        r0 = torch.load(dump / f"rank0_epoch{epoch}.pt")
        r1 = torch.load(dump / f"rank1_epoch{epoch}.pt")
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    # Rank 0 alone wrote the run folder: one set of files, one metrics line per epoch.
    assert {p.name for p in out.iterdir()} == FILES
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "report.json").read_text())["nm_ok"] is True
