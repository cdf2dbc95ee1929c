import pytest
import torch
import torchvision
from torch import nn

import maxq
from maxq.deploy.accelerate import Conv1x1AsLinear, accelerate_, candidates

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_refuses_with_a_clear_message():
    with pytest.raises(RuntimeError, match="CUDA"):
        accelerate_(nn.Linear(64, 64), torch.randn(2, 64))


def test_candidates_record_real_input_shapes():
    model = torchvision.models.resnet50(num_classes=10).eval()
    rows = {r.name: r for r in candidates(model, torch.randn(2, 3, 64, 64))}
    assert rows["fc"].kind == "linear" and rows["fc"].input_shape == (2, 2048)
    assert rows["layer1.0.conv1"].kind == "conv1x1" and rows["layer1.0.conv1"].input_shape == (2 * 16 * 16, 64)
    assert "layer1.0.conv2" not in rows  # 3x3


def test_conv1x1_lowering_is_exact():
    conv = nn.Conv2d(32, 48, 1)
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(Conv1x1AsLinear(conv)(x), conv(x))


def _sparse_mlp():
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))
    maxq.sparsify_(model, maxq.SRSTEConfig(skip_last=False))
    return maxq.fold_(model)


@pytest.mark.gpu
@cuda
def test_accelerate_keeps_outputs_and_reports_every_layer():
    model = _sparse_mlp().cuda().half()
    x = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = model(x).float()
    report = accelerate_(model, x)
    assert {r.name for r in report.rows} == {"0", "2", "4"}
    assert all(r.dense_ms and r.sparse_ms for r in report.rows if r.name != "4")
    with torch.no_grad():
        torch.testing.assert_close(model(x).float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@cuda
def test_accelerate_lowers_1x1_convs():
    model = torchvision.models.resnet50(num_classes=10)
    maxq.sparsify_(model, maxq.SRSTEConfig())
    maxq.fold_(model)
    model = model.cuda().eval()
    x = torch.randn(32, 3, 128, 128, device="cuda")
    with torch.no_grad():
        want = model.half()(x.half()).float()
    report = accelerate_(model, x, min_speedup=0.0)  # swap every layer the kernels take, to test the lowering
    assert any(r.kind == "conv1x1" and r.swapped for r in report.rows)
    with torch.no_grad():
        got = model(x.half()).float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
