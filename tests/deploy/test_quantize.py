"""INT8 (QDQ) and FP16 ONNX exports: N:M kept in the quantized weights, accuracy close to FP32, calibration on
training images only."""

import numpy as np
import pytest
import torch

from maxq.cli import main
from maxq.train.checkpoint import load_folded
from maxq.train.data import load_dataset, normalize

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from maxq.deploy.onnx_export import onnx_metadata, onnx_weights  # noqa: E402
from maxq.deploy.quantize import calibration_images  # noqa: E402


def _top1(path, x, y):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return 100 * float((session.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).mean())


def _held_out():
    test = load_dataset("synthetic").test  # never seen by training or calibration
    x, y = test.tensors
    return normalize(x, load_dataset("synthetic").info), y


def test_int8_keeps_nm_and_accuracy(exported, capsys):
    summary = exported["summary"]["int8"]
    assert summary["nm_ok"] and summary["pruned_nonzero"] == 0 and len(summary["sparse_initializers"]) == 6
    assert summary["calibration"] == {"dataset": "synthetic", "split": "train", "samples": 256}
    assert main(["verify", str(exported["int8"])]) == 0
    proto = onnx.load(str(exported["int8"]))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    fp32 = onnx_weights(onnx.load(str(exported["onnx"])))
    layout = onnx_metadata(proto)["layout"]
    fp32_sparse = onnx_metadata(onnx.load(str(exported["onnx"])))["layout"]["sparse_initializers"]
    for int8_name, fp32_name in zip(layout["sparse_initializers"], fp32_sparse):
        q = inits[int8_name]
        assert q.dtype == np.int8
        assert not inits[int8_name.replace("_quantized", "_zero_point")].any()  # symmetric: zero point 0
        pruned = (fp32[fp32_name][0] == 0).numpy()
        assert pruned.mean() >= 0.5 and not q[pruned].any()  # every pruned weight is exactly 0 in int8
    assert onnx_metadata(proto)["arch"]["precision"] == "int8"
    x, y = _held_out()
    fp32_top1, int8_top1 = _top1(exported["onnx"], x, y), _top1(exported["int8"], x, y)
    assert fp32_top1 > 90 and abs(int8_top1 - fp32_top1) <= 1.0, (fp32_top1, int8_top1)


def test_verify_reads_the_int8_weights(exported, tmp_path, capsys):
    proto = onnx.load(str(exported["int8"]))
    name = onnx_metadata(proto)["layout"]["sparse_initializers"][0]
    init = next(i for i in proto.graph.initializer if i.name == name)
    q = numpy_helper.to_array(init).copy()
    q.reshape(q.shape[0], -1)[0, :4] = 1  # one 2:4 block of the quantized weight made dense
    init.CopyFrom(numpy_helper.from_array(q, name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    assert main(["verify", str(tmp_path / "bad.onnx")]) == 1
    assert "NOT N:M" in capsys.readouterr().out


def test_fp16_parity(exported, trained_run):
    summary = exported["summary"]["fp16"]
    assert summary["nm_ok"] and max(summary["max_abs_diff"].values()) < 2e-2
    proto = onnx.load(str(exported["fp16"]))
    sparse = onnx_metadata(proto)["layout"]["sparse_initializers"]
    dtypes = {i.name: numpy_helper.to_array(i).dtype for i in proto.graph.initializer}
    assert sparse and all(dtypes[name] == np.float16 for name in sparse)
    model, _ = load_folded(trained_run / "model_folded.pt")
    x, _ = _held_out()
    with torch.no_grad():
        want = model.eval()(x).numpy()
    got = ort.InferenceSession(str(exported["fp16"]), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )
    assert got[0].dtype == np.float32  # fp32 inputs and outputs, fp16 inside
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got[0] - want).max() / scale < 1e-2
    assert (got[0].argmax(1) == want.argmax(1)).mean() >= 0.99


def test_calibration_images_are_training_images():
    splits = load_dataset("synthetic")
    calib = calibration_images("synthetic", None, 64)
    train = normalize(splits.train.tensors[0], splits.info).flatten(1)
    test = normalize(splits.test.tensors[0], splits.info).flatten(1)
    assert calib.shape == (64, 1, 16, 16) and calib.dtype == torch.float32
    same = (calib.flatten(1)[:, None] == train[None]).all(-1)
    assert same.any(1).all() and len(set(same.float().argmax(1).tolist())) == 64  # 64 distinct training images
    assert not (calib.flatten(1)[:, None] == test[None]).all(-1).any()  # and no test image
    assert torch.equal(calib, calibration_images("synthetic", None, 64))  # seeded
    with pytest.raises(ValueError, match="calib-samples"):
        calibration_images("synthetic", None, 0)
