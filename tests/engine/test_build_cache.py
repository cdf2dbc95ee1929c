"""The fused kernel's build cache: one build per source and torch version on a machine, whichever checkout or venv
asks (issue 27: two checkouts rebuilt each other's module on every start, silently)."""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from maxq._engine import kernels

SOURCE = kernels._SOURCE


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """torch's ``load`` replaced by a recorder that writes the library file; imports recorded too."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    calls = {"load": [], "import": []}

    def load(**kwargs):
        calls["load"].append(kwargs)
        time.sleep(calls.get("sleep", 0))
        name, folder = kwargs["name"], Path(kwargs["build_directory"])
        kernels._library(folder, name).write_bytes(b"built")
        return f"module {name}"

    def imported(name, library):
        calls["import"].append(library)
        return f"module {name}"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(kernels, "_import_built", imported)
    return calls


def _checkout(root: Path, text: bytes | None = None) -> Path:
    """A copy of the kernel source where another checkout (or venv) keeps it."""
    path = root / "src" / "maxq" / "_engine" / "csrc" / SOURCE.name
    path.parent.mkdir(parents=True)
    path.write_bytes(SOURCE.read_bytes() if text is None else text)
    return path


def test_two_checkouts_of_one_source_share_one_build(fake_build, tmp_path, monkeypatch):
    first, second = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    monkeypatch.setattr(kernels, "_SOURCE", first)
    assert kernels._load_or_build().startswith("module maxq_cpu_")
    (build,) = fake_build["load"]
    # Built from a copy in the cache, not from the checkout: the build command does not depend on where it is.
    staged = Path(build["sources"][0])
    assert staged.parent.parent == Path(build["build_directory"]) and staged.read_bytes() == first.read_bytes()
    assert str(tmp_path / "a") not in " ".join(map(str, build.values()))
    # The other checkout loads that build as it is: no second build (torch would re-run ninja and rebuild).
    monkeypatch.setattr(kernels, "_SOURCE", second)
    kernels._load_or_build()
    assert len(fake_build["load"]) == 1 and fake_build["import"] == [
        kernels._library(Path(build["build_directory"]), build["name"])
    ]
    # Without the stamp (a build that never finished), it builds again, with the very same command.
    (Path(build["build_directory"]) / kernels.BUILT_STAMP).unlink()
    kernels._load_or_build()
    assert len(fake_build["load"]) == 2 and fake_build["load"][1] == build


def test_another_source_or_torch_version_is_another_build(fake_build, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_SOURCE", _checkout(tmp_path / "a"))
    kernels._load_or_build()
    monkeypatch.setattr(kernels, "_SOURCE", _checkout(tmp_path / "b", SOURCE.read_bytes() + b"\n// changed\n"))
    kernels._load_or_build()
    monkeypatch.setattr(kernels.torch, "__version__", "0.0.1")
    kernels._load_or_build()
    names = [call["name"] for call in fake_build["load"]]
    assert len(set(names)) == 3 and fake_build["import"] == []


def test_a_build_says_so_while_it_runs(fake_build, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_SOURCE", _checkout(tmp_path / "a"))
    monkeypatch.setattr(kernels, "BUILD_HEARTBEAT_S", 0.05)
    fake_build["sleep"] = 0.3
    with caplog.at_level(logging.INFO, logger="maxq"):
        kernels._load_or_build()
    text = caplog.text
    assert "building the fused CPU kernels into" in text and "MAXQ_CPU_KERNELS=0" in text
    assert "still building the fused CPU kernels" in text and "done building the fused CPU kernels in" in text


@pytest.mark.skipif(kernels.cpu_kernels() is None, reason="fused CPU kernels unavailable (no compiler or disabled)")
def test_a_second_checkout_loads_the_real_build_without_rebuilding(tmp_path):
    library = Path(kernels.cpu_kernels().__file__)
    before = library.stat().st_mtime_ns
    copy = tmp_path / "checkout" / "src"
    shutil.copytree(Path(kernels.__file__).parents[1], copy / "maxq")
    code = (
        "import logging, time; logging.basicConfig(level=logging.DEBUG, format='%(message)s'); "
        "import sys; from maxq._engine import kernels; t = time.time(); module = kernels.cpu_kernels(); "
        "print(module.__file__, kernels.__file__, round(time.time() - t, 1)); "
        "print(sorted(m for m in ('torch.utils.cpp_extension', 'setuptools') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(copy)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    found, imported = run.stdout.splitlines()
    loaded, source, seconds = found.split()
    # Found where torch keeps it without importing torch's build tools (setuptools: megabytes in every process).
    assert imported == "[]", imported
    assert Path(source).is_relative_to(copy) and Path(loaded) == library
    assert library.stat().st_mtime_ns == before, "the other checkout rebuilt the module"
    assert "loading the fused CPU kernels built before" in run.stderr and "building the" not in run.stderr
    assert float(seconds) < 20


@pytest.mark.parametrize("extensions_dir", [True, False], ids=["TORCH_EXTENSIONS_DIR", "default"])
def test_the_expected_folder_is_the_one_torch_builds_in(extensions_dir, tmp_path, monkeypatch):
    # The fast path's guess of the build folder (no import of torch.utils.cpp_extension) agrees with torch's own.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if extensions_dir:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    name = kernels._build_name(*kernels._isa_flags())
    expected = kernels._expected_build_dir(name)
    assert expected is not None and not expected.exists()  # a guess makes no folder
    assert expected == kernels._build_dir(name) and expected.is_relative_to(tmp_path)


def test_a_wrong_guess_falls_back_to_torchs_folder(fake_build, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_SOURCE", _checkout(tmp_path / "a"))
    monkeypatch.setattr(kernels, "_expected_build_dir", lambda name: tmp_path / "elsewhere" / name)
    kernels._load_or_build()
    kernels._load_or_build()  # built in torch's folder, found there though the guess points elsewhere
    (build,) = fake_build["load"]
    assert fake_build["import"] == [kernels._library(Path(build["build_directory"]), build["name"])]
