"""Deploy tests share one export of the shared trained run (every artifact kind, ~5 s)."""

import json

import pytest

from ..conftest import one_thread


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """``maxq export`` of ``trained_run`` to every kind: ``{kind: path}`` plus ``"summary"`` (the export JSON)."""
    pytest.importorskip("onnxruntime")
    from maxq.cli import main

    out = tmp_path_factory.mktemp("exported")
    paths = {
        "onnx": out / "m.onnx",
        "fp16": out / "m.fp16.onnx",
        "int8": out / "m.int8.onnx",
        "compressed": out / "m.maxq",
        "folded": out / "m_folded.pt",
    }
    argv = ["export", str(trained_run), "--json", str(out / "export.json"), "--calib-samples", "256"]
    for kind, path in paths.items():
        argv += [f"--{kind}", str(path)]
    with one_thread():
        assert main(argv) == 0
    return {**paths, "summary": json.loads((out / "export.json").read_text())}
