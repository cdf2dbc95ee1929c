"""The host-sync detector: its CPU stand-in flags what would synchronize on CUDA, and nothing else."""

import pytest
import torch

from maxq._engine.syncs import HostSync, host_syncs


def test_reading_values_back_is_counted():
    x = torch.randn(32)
    with host_syncs("cpu") as events:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 0]  # boolean indexing needs the count of selected entries
        torch.equal(x, x)
    assert [e.split(" at ")[0] for e in events] == [
        "aten._local_scalar_dense",
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.index",
        "aten.equal",
    ]


def test_device_side_work_is_not_counted():
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(4, 16)
    with host_syncs("cpu") as events:
        y = torch.nn.functional.linear(x, w).relu()
        y = y.masked_fill(y > 1, 0.0) + x[:, :4].topk(2, dim=1).values.sum()
        y.sum().backward()
        x.grad.index_select(0, torch.tensor([0, 2]))
    assert events == []


def test_fail_mode_raises_at_the_first_sync_and_says_where():
    x = torch.randn(4)
    with pytest.raises(HostSync, match=r"_local_scalar_dense at test_syncs.py:\d+"), host_syncs("cpu", fail=True):
        float(x.max())


def test_repeat_interleave_with_known_output_size_does_not_sync():
    r = torch.tensor([1, 2])
    with host_syncs("cpu") as events:
        torch.repeat_interleave(r, r, output_size=3)
    assert events == []
    with host_syncs("cpu") as events:
        torch.repeat_interleave(r, r)
    assert [e.split(" at ")[0] for e in events] == ["aten.repeat_interleave"]
