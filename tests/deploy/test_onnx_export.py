import pytest
import torch

import maxq
from maxq.deploy.bnfold import fold_batchnorm_
from maxq.deploy.verify import verify_file

from ..nets import mlp, small_cnn, train_steps

pytest.importorskip("onnxruntime")
from maxq.deploy.onnx_export import export_onnx, onnx_parity


@pytest.mark.parametrize("builder, shape", [(small_cnn, (1, 3, 8, 8)), (lambda: mlp((64, 128, 96, 16)), (1, 64))])
@pytest.mark.parametrize("nm", [(2, 4), (1, 16)])
def test_onnx_parity_and_initializers_verify(builder, shape, nm, tmp_path):
    n, m = nm
    model = builder()
    if shape[1] % m and len(shape) == 2:
        pytest.skip("input not divisible")
    sp = maxq.sparsify_(model, maxq.SRSTEConfig(n=n, m=m))
    train_steps(model, sp, steps=2)
    maxq.fold_(model).eval()
    if len(shape) == 4:
        fold_batchnorm_(model)
    sparse = export_onnx(model, tmp_path / "m.onnx", torch.randn(shape), n=n, m=m)
    assert len(sparse) == len(model.maxq_layout["layers"])
    diffs = onnx_parity(model, tmp_path / "m.onnx", torch.randn(shape), batch_sizes=(1, 3, 16))
    assert max(diffs.values()) < 1e-4
    check, kind, _ = verify_file(tmp_path / "m.onnx")
    assert kind == "onnx" and check.ok, str(check)
