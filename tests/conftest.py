"""Shared test settings: deterministic, small, CPU; the fused kernels are exercised where they build."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Fewer threads than cores keeps timings stable and leaves room for subprocess tests.
torch.set_num_threads(2)
os.environ.setdefault("MAXQ_QUIET", "1")

PATTERNS = [(2, 4), (1, 4), (2, 8), (1, 16), (4, 8)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def fused_params() -> list:
    """Run a test with the eager path and, where they build, the fused CPU kernels."""
    from maxq._engine.kernels import cpu_kernels

    have = cpu_kernels() is not None
    return [
        pytest.param(False, id="eager"),
        pytest.param(True, id="fused", marks=pytest.mark.skipif(not have, reason="fused CPU kernels unavailable")),
    ]


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one torch thread, and stay fast on a busy machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished MaxQ 2:4 ``maxq train`` run on the synthetic set (cnn_small, 2 epochs, ~3 s on one thread,
    ~99 % test top-1). Shared: read it, or copy it before changing anything."""
    from maxq.train.loop import train
    from maxq.train.recipe import TrainConfig

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = TrainConfig(
        dataset="synthetic", model="cnn_small", epochs=2, batch_size=32, ramp=(0, 0.5), per_step=True,
        out=str(out), progress=False, threads=1,
    )  # fmt: skip
    with one_thread():  # train() sets the thread count process-wide: restored after
        train(cfg)
    return out
