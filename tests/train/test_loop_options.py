"""``maxq train`` options that change how the step runs, not what it computes: --compile, --channels-last."""

import json

import pytest
import torch

from maxq.train.loop import train
from maxq.train.recipe import TrainConfig


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cnn_small", epochs=1, batch_size=64, out=str(out), progress=False)
    base.update(threads=1, per_step=True, **kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_compile_flag_compiles_the_forward_and_trains_the_same(tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def spy(model, **kwargs):  # the AOT-eager backend: a real trace of forward and backward, quick to build
        compiled.append(type(model).__name__)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    eager = train(_cfg(tmp_path / "eager"))
    torch._dynamo.reset()
    comp = train(_cfg(tmp_path / "compiled", compile=True))
    torch._dynamo.reset()
    assert compiled == ["Sequential"]  # the model, once
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)
    assert comp["nm_ok"] and eager["nm_ok"]


@pytest.mark.slow
def test_channels_last_trains_the_same(tmp_path):
    train(_cfg(tmp_path / "a"))
    cl = train(_cfg(tmp_path / "b", channels_last=True))
    # Other conv kernels: the same training to float rounding, which 16 SGD steps at lr 0.1 amplify (a dense run's
    # epoch loss moves by 1e-3 on one thread, 3e-3 with masks); the masks on channels_last weights are checked
    # exactly in tests/engine/test_kernels.py.
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), rel=1e-2)
    assert cl["nm_ok"]
