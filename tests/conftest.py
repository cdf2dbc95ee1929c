"""Shared test settings: deterministic, small, CPU; the fused kernels are exercised where they build."""

from __future__ import annotations

import json
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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``MAXQ_TEST_RESULTS=FILE`` (set by scripts/gpu_check.sh), append one JSON line per test as it ends, so
    a stage killed by its timeout still leaves the results so far."""
    path = os.environ.get("MAXQ_TEST_RESULTS")
    if not path or (report.when != "call" and report.passed):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2]
    else:
        message = "\n".join(report.longreprtext.splitlines()[-25:]) if report.failed else ""
    entry = {
        "test": report.nodeid,
        "outcome": f"error ({report.when})" if report.failed and report.when != "call" else report.outcome,
        "duration_s": round(report.duration, 3),
        "message": message,
        "properties": {k: v for k, v in report.user_properties},
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
