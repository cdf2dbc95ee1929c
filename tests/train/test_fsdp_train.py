"""``maxq train --fsdp``: under torchrun (2 CPU processes, gloo) a sharded run equals a DDP run of the same
configuration and its folded model is an ordinary, exactly N:M one; a worker killed by SIGKILL resumes in fresh
processes to the very same results; in one process (a group of one) it equals the plain run, resumes exactly, and
refuses a changed shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import maxq
from maxq.train.checkpoint import CheckpointError, load_checkpoint, load_folded
from maxq.train.loop import train
from maxq.train.recipe import TrainConfig

from .. import torchrun
from .test_trainer import _wait_for_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fsdp")]

EPOCHS = 6  # 4 steps per epoch and process: short, and enough epochs that a kill lands mid-run
ARGS = ["--dataset", "synthetic", "--subset", "256", "--batch-size", "32", "--epochs", str(EPOCHS), "--per-step"]
# The ramp ends after 2 steps, then masks are updated every 7: at no checkpoint (every 4 steps) are they those of
# the weights it holds, so only the sparsifier's own state resumes them (recomputed from the weights, they differ).
ARGS += ["--ramp", "0", "0.5", "--update-every", "7", "--no-progress", "--threads", "1"]
TIMES = ("epoch_time_s", "elapsed_s", "train_time_s", "files")


def _env() -> dict[str, str]:
    src = str(Path(maxq.__file__).parents[1])  # the maxq under test, in the workers too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


def _torchrun(*args: str) -> subprocess.Popen:
    cmd = torchrun.command(["-m", "maxq", "train", *ARGS, *args])
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train(out: Path, *args: str) -> None:
    """A whole run into ``out`` (run once more, from scratch, if gloo's teardown crashes)."""
    proc = torchrun.run(["-m", "maxq", "train", *ARGS, "--out", str(out), *args], env=_env(), clean=[out])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def _finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-6000:]
    return output


def _workers(pid: int) -> list[int]:
    """The processes torchrun started (its children)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _rank(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def make(root: Path) -> None:
        _train(root / "ddp")
        _train(root / "fsdp", "--fsdp")
        killed = root / "killed"
        proc = _torchrun("--out", str(killed), "--fsdp")
        _wait_for_checkpoint(proc, killed)
        rank0 = next(p for p in _workers(proc.pid) if _rank(p) == 0)  # the one that writes the checkpoint's index
        os.kill(rank0, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, output[-3000:]
        done = load_checkpoint(killed / "checkpoint.pt", kind="maxq.checkpoint-sharded/1")["epoch"]
        resumed = _finish(_torchrun("--out", str(killed), "--resume"))  # the resume command, under torchrun
        (root / "killed.json").write_text(json.dumps({"done": done, "resumed": resumed}))

    root = torchrun.once(tmp_path_factory, "fsdp-train", make)
    killed = json.loads((root / "killed.json").read_text())
    return root, killed["done"], killed["resumed"]


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in lines]


def _folded(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_folded.pt", weights_only=True)["state_dict"]


def test_fsdp_run_equals_the_ddp_run_and_folds_to_a_plain_nm_model(runs):
    root, _, _ = runs
    ddp, fsdp = root / "ddp", root / "fsdp"
    assert {p.name for p in ddp.iterdir()} <= {p.name for p in fsdp.iterdir()}  # the same files, and the shards
    assert [p.name.split("-")[0] for p in fsdp.glob("checkpoint.sharded-*")] == ["checkpoint.sharded"]
    a, b = _folded(ddp), _folded(fsdp)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
        assert torch.equal(b[key] == 0, a[key] == 0), key  # the same masks
    # Training takes the same steps. The evaluation differs a little: rank 1 of the DDP run evaluates its half of
    # the test set with its own BatchNorm statistics, the sharded run's with rank 0's (broadcast at each epoch's end).
    for x, y in zip(_records(ddp), _records(fsdp), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key.startswith("test_"):
                assert y[key] == pytest.approx(x[key], rel=0.05, abs=5.0 if "top" in key else 0.0), key
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
    report = json.loads((fsdp / "report.json").read_text())
    assert report["nm_ok"] is True and report["epochs"] == EPOCHS
    model, file = load_folded(fsdp / "model_folded.pt")  # loads into the plain model (strict)
    assert type(model[3]) is torch.nn.Conv2d and maxq.check_nm(model, 2, 4).ok
    assert report["sparse_layers"] == file["layout"]["layers"] and len(report["sparse_layers"]) == 6
    assert report["params_nonzero"] == sum(int((v != 0).sum()) for k, v in b.items() if k.endswith(("weight", "bias")))


def test_killed_fsdp_run_resumes_exactly(runs):
    root, done, output = runs
    assert 1 <= done < EPOCHS
    killed, straight = root / "killed", root / "fsdp"
    assert f"resuming {killed} after epoch {done} of {EPOCHS}: continuing with epoch {done + 1}" in output
    a, b = _folded(straight), _folded(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(killed) == _records(straight)
    report, expected = (json.loads((run / "report.json").read_text()) for run in (killed, straight))
    assert {k: v for k, v in report.items() if k not in TIMES} == {k: v for k, v in expected.items() if k not in TIMES}
    assert len(list(killed.glob("checkpoint.sharded-*"))) == 1 and not list(killed.glob(".*tmp*"))


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", model="cnn_small", epochs=2, batch_size=32, subset=128, per_step=True)
    base.update(ramp=(0, 0.5), update_every=3)  # the checkpoint's masks are not its weights' (see ARGS)
    return TrainConfig(out=str(out), progress=False, threads=1, **{**base, **kw})


def test_one_process_fsdp_equals_the_plain_run_and_resumes_exactly(tmp_path):
    plain = train(_cfg(tmp_path / "plain"))
    straight = train(_cfg(tmp_path / "fsdp", fsdp=True))
    assert not torch.distributed.is_initialized()  # the group of one is closed again
    a, b = _folded(tmp_path / "plain"), _folded(tmp_path / "fsdp")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "plain") == _records(tmp_path / "fsdp")
    assert straight["nm_ok"] is True and straight["top1_folded"] == plain["top1_folded"]

    def crash(epoch, record, sparsifier):
        raise RuntimeError("power cut")

    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="power cut"):
        train(_cfg(out, fsdp=True), on_epoch_end=crash)
    train(_cfg(out, fsdp=True, resume=True))
    c = _folded(out)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert _records(out) == _records(tmp_path / "fsdp")


def test_a_changed_shard_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "r"

    def crash(epoch, record, sparsifier):
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(_cfg(out, fsdp=True), on_epoch_end=crash)
    (shards,) = out.glob("checkpoint.sharded-*")
    shard = next(p for p in sorted(shards.iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt"):
        train(_cfg(out, fsdp=True, resume=True))
    assert (out / "metrics.jsonl").read_bytes() == before and not torch.distributed.is_initialized()
    with pytest.raises(CheckpointError, match="fsdp: checkpoint True vs asked False"):
        train(_cfg(out, resume=True), given={"resume", "fsdp"})
