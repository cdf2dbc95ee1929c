"""benchmarks/memory.py: a cell measured in this process (tiny sizes), and ``--where``'s sampler. The real figures come
from fresh processes (docs/RESULTS.md section 9); the GPU check's dry run rehearses the in-process CUDA mode."""

import importlib.util
import sys
from pathlib import Path

import pytest

from ..conftest import one_thread

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("maxq_benchmark_memory", ROOT / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(_spec)
sys.modules["maxq_benchmark_memory"] = memory
_spec.loader.exec_module(memory)


@pytest.mark.parametrize("method", ["dense", "srste"])
def test_a_cell_reports_its_peak_and_where_it_was(method):
    spec = {"model": "linear8", "tiny": True, "dtype": "fp32", "optimizer": "sgd", "method": method, "nm": "2:4",
            "steps": 2, "threads": 1, "where": True}  # fmt: skip
    with one_thread():
        out = memory.worker(spec)
    assert out["peak_rss_mib"] > 0 and out["where_mib"] == out["where_anon_mib"] + out["where_file_mib"]
    assert out["where_mib"] <= out["peak_rss_mib"] + 1  # a sample of the same process, never above its peak
    phases = ("setup", "forward ", "backward", "regularize_", "optimizer step", "sparsifier step")
    assert out["where"].startswith(phases), out["where"]
    assert out["weight_bytes"] == sum(4 * p.numel() for p in memory._build("linear8", tiny=True)[0].parameters())
    if method == "dense":
        assert out["sparse_weight_bytes"] == 0 and "mask_bytes" not in out
    else:  # one bit per weight and the kernels' few bytes per row: under the goal even at this tiny width
        assert 0.03 * out["sparse_weight_bytes"] < out["mask_bytes"] < memory.GOALS[method] * out["sparse_weight_bytes"]
