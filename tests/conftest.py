"""Shared test settings: deterministic, small, CPU; the fused kernels are exercised where they build."""

from __future__ import annotations

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
