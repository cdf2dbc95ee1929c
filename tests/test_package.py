"""The package as a user meets it: light import, the layers in the tree, old module paths, docs that stand alone."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    # maxq itself imports none of these (torch may import tqdm on its own: compare with a bare `import torch`).
    heavy = ("matplotlib", "tqdm", "onnx", "onnxruntime", "torchvision", "yaml", "safetensors")
    code = "import sys, {}; print(sorted(m for m in {!r} if m in sys.modules))"
    loaded = {}
    for module in ("torch", "maxq"):
        run = subprocess.run([sys.executable, "-c", code.format(module, heavy)], capture_output=True, text=True)
        loaded[module] = set(eval(run.stdout))
    assert loaded["maxq"] == loaded["torch"]


@pytest.mark.parametrize("module", ["maxq", "maxq.integrations"])
def test_import_leaves_the_training_frameworks_alone(module):
    # maxq.integrations.hf / .lightning import their framework; the package and `import maxq` never do.
    frameworks = ("transformers", "accelerate", "lightning", "pytorch_lightning")
    code = f"import sys, {module}; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert eval(run.stdout) == []


def test_folders_show_the_layers():
    pkg = ROOT / "src" / "maxq"
    assert {p.name for p in pkg.iterdir() if p.is_dir() and not p.name.startswith("__")} >= {
        "core",
        "_engine",
        "deploy",
        "train",
    }
    assert not [p.name for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__", "cli", "_compat")]


def test_old_module_paths_still_import():
    import maxq.train.loop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import maxq.trainer as old
    assert old is maxq.train.loop
    assert any("moved to maxq.train.loop" in str(w.message) for w in caught)


@pytest.mark.parametrize("doc", ["README.md", "docs/METHOD.md", "docs/RESULTS.md"])
def test_docs_stand_alone(doc):
    text = (ROOT / doc).read_text()
    assert "../shared" not in text and "SPEC" not in text
    if doc == "README.md":
        assert "docs/METHOD.md" in text
