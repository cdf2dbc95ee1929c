"""``maxq eval`` on every artifact kind: FP32 kinds give the run's own top-1; errors name the file."""

import json

import pytest

from maxq.cli import main
from maxq.deploy.evaluate import evaluate_file

pytest.importorskip("onnxruntime")


def test_every_fp32_artifact_scores_the_runs_top1(trained_run, exported):
    report = json.loads((trained_run / "report.json").read_text())
    files = {
        "run": trained_run,
        "checkpoint": trained_run / "checkpoint.pt",
        "folded": trained_run / "model_folded.pt",
        "exported folded": exported["folded"],
        "compressed": exported["compressed"],
        "onnx": exported["onnx"],
    }
    for name, path in files.items():
        result = evaluate_file(path)  # the dataset comes from the file
        assert result.dataset == "synthetic" and result.samples == 256, name
        assert result.top1 == report["top1_folded"] == report["top1_last"], name
        assert result.top5 == report["top5_last"], name
    fp16, int8 = evaluate_file(exported["fp16"]), evaluate_file(exported["int8"])
    assert fp16.precision == "fp16" and abs(fp16.top1 - report["top1_last"]) <= 0.5
    assert int8.precision == "int8" and abs(int8.top1 - report["top1_last"]) <= 1.0


def test_eval_cli_json_and_errors(exported, tmp_path, capsys):
    assert main(["eval", str(exported["int8"]), "--json", "--batch-size", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "onnx" and out["precision"] == "int8" and out["samples"] == 256 and out["top1"] > 90
    data = bytearray(exported["compressed"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.maxq").write_bytes(data)
    assert main(["eval", str(tmp_path / "bad.maxq")]) == 2
    err = capsys.readouterr().err
    assert "bad.maxq is corrupt" in err and err.count("\n") == 1
    assert main(["eval", str(exported["onnx"]), "--dataset", "mnist-ultra"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_onnx_without_records_needs_dataset(trained_run, tmp_path, capsys):
    import torch

    from maxq.deploy.onnx_export import export_onnx
    from maxq.train.checkpoint import load_folded

    model, _ = load_folded(trained_run / "model_folded.pt")
    export_onnx(model, tmp_path / "bare.onnx", torch.randn(1, 1, 16, 16))  # a file with no maxq records
    assert main(["eval", str(tmp_path / "bare.onnx")]) == 2
    assert "pass --dataset" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "bare.onnx"), "--dataset", "synthetic"]) == 0
