"""examples/hf_trainer_text.py in its --quick mode: trains, folds, saves, reloads without maxq, learns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_text.py"


def test_example_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXQ_CPU_KERNELS", "0")  # the example does not need the fused kernels' build
    spec = importlib.util.spec_from_file_location("hf_trainer_text", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert result["layers"] == 13  # every Linear but the classifier
    assert result["accuracy"] > 0.7  # chance is 0.5
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_example_help_is_the_docstring(capsys):
    spec = importlib.util.spec_from_file_location("hf_trainer_text", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "2:4" in capsys.readouterr().out
