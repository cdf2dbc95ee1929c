"""The lean mask storage changed no bit of the math: every frozen run (``frozen_runs.py``, recorded with the
weight-sized float masks before the change) gives the same losses, masks at every step, eval output and folded
weights, on the fused CPU kernels and on the device-agnostic path."""

from __future__ import annotations

import json

import pytest

from . import frozen_runs

_DATA = json.loads(frozen_runs.PATH.read_text())
_NEEDS_HF = {name for name, spec in _DATA["runs"].items() if spec["spec"]["model"] == "lm"}


def _skip_reason() -> str:
    here = frozen_runs.environment()
    if here != _DATA["environment"]:
        return f"recorded on {_DATA['environment']}, this machine is {here}: float results differ by platform"
    return ""


@pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "-")
@pytest.mark.parametrize("name", sorted(_DATA["runs"]))
def test_run_is_bit_identical_to_the_float_mask_implementation(name):
    if name in _NEEDS_HF:
        pytest.importorskip("transformers")
    if "fused" in name or name.startswith(("mlp_adamw", "mlp_bf16", "srste_hooked", "maxq_hooked")):
        from maxq._engine.kernels import cpu_kernels

        if frozen_runs.specs()[name]["fused"] and cpu_kernels() is None:
            pytest.skip("fused CPU kernels unavailable")
    recorded = _DATA["runs"][name]
    spec = frozen_runs.specs()[name]
    assert json.loads(json.dumps(spec)) == recorded["spec"]
    got = frozen_runs.run(spec)
    assert got["losses"] == recorded["losses"]
    assert got["masks"] == recorded["masks"]
    assert got["eval"] == recorded["eval"]
    assert got["folded"] == recorded["folded"]
