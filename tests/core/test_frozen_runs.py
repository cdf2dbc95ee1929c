"""The lean mask storage changed no bit of the math: every frozen run (``frozen_runs.py``, recorded with the
weight-sized float masks before the change) gives the same losses, masks at every step, eval output and folded
weights, on the fused CPU kernels and on the device-agnostic path."""

from __future__ import annotations

import json

import pytest

from . import frozen_runs

_RECORDING = frozen_runs.recording()
_NAMES = sorted(frozen_runs._load()["recordings"][0]["runs"])


def _skip_reason() -> str:
    if _RECORDING is None:
        recorded = [rec["environment"] for rec in frozen_runs._load()["recordings"]]
        here = frozen_runs.environment()
        return f"recorded on {recorded}, this machine is {here}: float results differ by platform"
    return ""


def test_every_recording_holds_every_run_and_the_probe_tells_platforms_apart():
    recordings = frozen_runs._load()["recordings"]
    assert all(sorted(rec["runs"]) == _NAMES for rec in recordings)
    probes = [rec["environment"].get("probe") for rec in recordings]
    assert len(set(probes)) == len(probes)  # one recording per platform
    assert frozen_runs.probe.__wrapped__() == frozen_runs.probe()  # deterministic (else it would match nothing)


@pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "-")
@pytest.mark.parametrize("name", _NAMES)
def test_run_is_bit_identical_to_the_float_mask_implementation(name):
    if frozen_runs.specs()[name]["model"] == "lm":
        pytest.importorskip("transformers")
    if "fused" in name or name.startswith(("mlp_adamw", "mlp_bf16", "srste_hooked", "maxq_hooked")):
        from maxq._engine.kernels import cpu_kernels

        if frozen_runs.specs()[name]["fused"] and cpu_kernels() is None:
            pytest.skip("fused CPU kernels unavailable")
    recorded = _RECORDING["runs"][name]
    spec = frozen_runs.specs()[name]
    assert json.loads(json.dumps(spec)) == recorded["spec"]
    got = frozen_runs.run(spec)
    assert got["losses"] == recorded["losses"]
    assert got["masks"] == recorded["masks"]
    assert got["eval"] == recorded["eval"]
    assert got["folded"] == recorded["folded"]
