"""benchmarks/train_cost.py on the CPU with tiny models: what it measures and writes (the dry run of
scripts/gpu_check.sh covers every variant and torch.compile)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_cost", ROOT / "benchmarks" / "train_cost.py")
train_cost = importlib.util.module_from_spec(_spec)
sys.modules["train_cost"] = train_cost  # dataclasses look their module up
_spec.loader.exec_module(train_cost)


def test_model_spec_parsing():
    assert train_cost.ModelSpec.parse("resnet50") == train_cost.ModelSpec("resnet50", 224, 128)
    assert train_cost.ModelSpec.parse("resnet18_cifar:32:256") == train_cost.ModelSpec("resnet18_cifar", 32, 256)
    with pytest.raises(Exception, match="NAME"):
        train_cost.ModelSpec.parse("a:1:2:3")


def test_two_models_every_row_and_a_compile_left_out_for_the_budget(tmp_path):
    out = tmp_path / "cost.json"
    argv = ["--device", "cpu", "--models", "cnn_small:8:2", "resnet20:8:2", "--variants", "dense", "srste"]
    argv += ["--compile-variants", "dense", "--budget-s", "0", "--rounds", "2", "--steps", "1", "--warmup", "1"]
    assert train_cost.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["cnn_small", "resnet20"]
    for entry in result["models"].values():
        rows = entry["rows"]
        assert set(rows) == {"dense/eager", "srste/eager"} and entry["errors"] == {}
        assert rows["dense/eager"]["ratio_to_dense"] == 1.0 and rows["srste/eager"]["step_ms"] > 0
        assert len(rows["srste/eager"]["step_ms_all"]) == 1  # the second round was over the budget
        assert rows["dense/eager"]["host_syncs_step"] == 0 and rows["dense/eager"]["host_syncs_mask_update"] == 0
        assert entry["skipped"]["dense/compiled"].startswith("budget")
        assert entry["skipped"]["rounds"] == "stopped after 1 of 2 rounds: budget"
    assert result["settings"]["update_every"] == 1 and result["device"].startswith("cpu")
