"""Correctness on CUDA (``pytest -m gpu``; skipped without CUDA unless ``MAXQ_TEST_DEVICE`` is set).

The checks live in :mod:`tests.gpu.checks` so that ``scripts/gpu_check.py`` can run them without pytest; each test
here runs one and records what it returns as test properties.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from . import checks

pytestmark = pytest.mark.gpu


def _run(check: Callable[[torch.device], dict[str, Any]], device: torch.device, record: Callable) -> None:
    try:
        info = check(device)
    except checks.SkipCheck as exc:
        pytest.skip(str(exc))
    for key, value in (info or {}).items():
        record(key, value)


def test_masks_match_cpu(device, record_property):
    _run(checks.check_masks_match_cpu, device, record_property)


def test_bf16_channels_last_training(device, record_property):
    _run(checks.check_bf16_channels_last_training, device, record_property)


def test_compiled_equals_eager(device, record_property):
    _run(checks.check_compiled_equals_eager, device, record_property)


def test_training_step_has_no_host_sync(device, record_property):
    _run(checks.check_training_step_has_no_host_sync, device, record_property)


def test_accelerate(device, record_property):
    _run(checks.check_accelerate, device, record_property)


def test_every_check_has_a_test():
    names = {f"test_{c.__name__.removeprefix('check_')}" for c in checks.CHECKS}
    assert names <= set(globals())
