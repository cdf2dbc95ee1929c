"""The device the CUDA checks run on: CUDA, or the CPU when ``MAXQ_TEST_DEVICE=cpu`` (a rehearsal)."""

from __future__ import annotations

import faulthandler
import os
import signal

import pytest
import torch

from .checks import SkipCheck, target_device

if os.environ.get("MAXQ_TEST_RESULTS"):  # under scripts/gpu_check.sh: a stage timeout shows where it hung
    faulthandler.register(signal.SIGTERM, chain=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    try:
        return target_device()
    except SkipCheck as exc:
        pytest.skip(str(exc))
