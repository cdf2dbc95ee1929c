"""benchmarks/query_scale.py and mask_churn.py: the statistics RESULTS.md quotes in its investigation."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("query_scale", ROOT / "benchmarks" / "query_scale.py")
query_scale = importlib.util.module_from_spec(_spec)
sys.modules["query_scale"] = query_scale
_spec.loader.exec_module(query_scale)


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (16, 32)])
def test_tau_sets_how_soft_the_mask_is(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    sharp = query_scale.layer_stats(w, 1, 4, tau=1e-6)
    flat = query_scale.layer_stats(w, 1, 4, tau=1e4)
    # tau far below the weight scale: every query is a saturated 0/1 step; far above: every sigmoid sits near 0.5.
    assert sharp["soft_f"] == 0.0 and flat["soft_f"] == pytest.approx(1.0)
    # Which weights a query selects does not depend on tau: only the sigmoid's value does (1 when sharp, 1/2 flat).
    assert flat["mean"] - 1 == pytest.approx(0.5 * (sharp["mean"] - 1), rel=1e-3)
    if len(shape) == 2:
        assert torch.isnan(torch.tensor(sharp["soft_k"]))  # Linear: no kernel query
    assert 1.0 <= sharp["mean"] <= 3.0 and sharp["cv"] > 0


def test_mask_churn_counts_replaced_survivors():
    spec = importlib.util.spec_from_file_location("mask_churn", ROOT / "benchmarks" / "mask_churn.py")
    mask_churn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mask_churn)
    before = {"a": torch.tensor([True, False, False, False, True, False, False, False])}  # 1:4, two blocks
    after = {"a": torch.tensor([False, True, False, False, True, False, False, False])}  # first block changed
    assert mask_churn.churn(before, after) == 0.5 and mask_churn.churn(before, before) == 0.0
