"""The built package as a user installs it: sdist and wheel from ``python -m build``, the wheel installed into a
fresh virtual environment, run from outside the source tree (no ``PYTHONPATH``, cwd elsewhere).

The fresh environment reuses the already installed PyTorch (and the other requirements) through a ``.pth`` line
pointing at this interpreter's site-packages (nothing is downloaded); the wheel's requirements are checked against
what it finds there, so a range that excludes the development versions fails here. Built once per source version
(the wheel and the venv are cached under ``build/wheel-smoke/<hash>``; the venv loads the machine's fused-kernel
build, as a user's second venv would); the smoke runs run every time. Deselect with ``-m "not wheel"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

# One xdist worker runs this file: its module fixture builds into build/wheel-smoke/ (no two builders at once).
pytestmark = [pytest.mark.wheel, pytest.mark.xdist_group("wheel")]

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).with_name("wheel_smoke.py")
KERNEL = "maxq/_engine/csrc/maxq_cpu.cpp"


def _source_hash() -> str:
    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    files += sorted(p for p in (ROOT / "src" / "maxq").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert run.returncode == 0, f"{cmd} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def installed() -> dict[str, Path]:
    """``dist/`` (sdist + wheel) and a venv with the wheel installed, for the current sources."""
    cache = ROOT / "build" / "wheel-smoke" / _source_hash()
    dist, venv, done = cache / "dist", cache / "venv", cache / "complete"
    if not done.exists():
        shutil.rmtree(cache, ignore_errors=True)
        # The sdist first, then the wheel built from the unpacked sdist: a file missing from either fails here.
        # --no-isolation: build with this environment's setuptools instead of downloading one.
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], cwd=ROOT)
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        site = Path(
            _run(
                [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
            ).stdout.strip()
        )
        # The requirements come from this environment (after the venv's own site-packages, where maxq goes).
        (site / "_reuse_requirements.pth").write_text(sysconfig.get_path("purelib") + "\n")
        wheel = next(dist.glob("maxq-*.whl"))
        # --ignore-installed: this environment's own (editable) maxq is visible through the .pth line and must
        # neither satisfy the install nor be touched; --no-deps: the requirements are checked below instead.
        _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
              "--no-index", "--no-deps", "--ignore-installed", "--disable-pip-version-check", str(wheel)])  # fmt: skip
        # pip would put ninja's executable into the venv's bin (cpp_extension needs it on PATH).
        ninja = Path(sys.executable).parent / "ninja"
        if ninja.exists() and not (venv / "bin" / "ninja").exists():
            (venv / "bin" / "ninja").symlink_to(ninja)
        done.touch()
    return {"dist": dist, "venv": venv}


def _env(venv: Path, extensions: Path | None, compiler: bool) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, no maxq settings; ``extensions``: a torch extension
    cache of its own (``None``: the machine's, as a user's venv would share it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MAXQ_", "VIRTUAL_ENV"))}
    if extensions is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    if compiler:
        env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    else:  # no C++ compiler anywhere: only the venv's bin (python, maxq, ninja) on PATH, CC/CXX point nowhere
        env.update(PATH=str(venv / "bin"), CC="/nonexistent", CXX="/nonexistent")
    return env


CHECK_REQUIREMENTS = """
import importlib.metadata as md, json
from packaging.requirements import Requirement
dist = md.distribution("maxq")
unmet = []
for text in dist.requires or []:
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        try:
            found = md.version(req.name)
        except md.PackageNotFoundError:
            found = None
        if found is None or not req.specifier.contains(found, prereleases=True):
            unmet.append(f"{text} (found {found})")
print(json.dumps({"location": str(dist.locate_file("")), "requires": dist.requires, "unmet": unmet}))
"""


def test_requirements_met_by_the_installed_pytorch(installed, tmp_path):
    venv = installed["venv"]
    env = _env(venv, None, compiler=True)
    run = _run([str(venv / "bin" / "python"), "-c", CHECK_REQUIREMENTS], cwd=tmp_path, env=env)
    result = json.loads(run.stdout)
    assert Path(result["location"]).resolve().is_relative_to(venv.resolve())  # the wheel's metadata, not ours
    assert any(r.startswith("torch>=") for r in result["requires"])
    assert result["unmet"] == []


def test_sdist_and_wheel_carry_the_kernel_source(installed):
    wheel = next(installed["dist"].glob("maxq-*.whl"))
    sdist = next(installed["dist"].glob("maxq-*.tar.gz"))
    wheel_names = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tar:
        sdist_names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert KERNEL in wheel_names
    assert f"src/{KERNEL}" in sdist_names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in wheel_names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in wheel_names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires and all("==" not in line for line in requires), requires  # ranges, not our pins


@pytest.mark.parametrize("compiler", [True, False], ids=["fused", "no-compiler"])
def test_installed_wheel_trains_folds_verifies(installed, compiler, tmp_path):
    venv = installed["venv"]
    # With a compiler, the machine's kernel cache: the build of this source and torch version that this session
    # (or any checkout or venv before it) made is loaded as it is, never rebuilt for another venv (issue 27).
    # Without a compiler: an empty kernel cache, so the build is attempted (and fails) in this run.
    extensions = None if compiler else tmp_path / "torch_extensions"
    env = _env(venv, extensions, compiler)
    work = tmp_path / "work"
    work.mkdir()
    version = _run([str(venv / "bin" / "maxq"), "--version"], cwd=work, env=env).stdout
    smoke = _run([str(venv / "bin" / "python"), str(SMOKE), str(work)], cwd=work, env=env)
    result = json.loads(smoke.stdout.strip().splitlines()[-1])

    assert Path(result["maxq_file"]).resolve().is_relative_to(venv.resolve()), result["maxq_file"]
    assert result["version"] in version
    assert result["dev_only_imported"] == []
    assert result["nm_ok"] and result["finite"] and result["layers"] == ["3", "8"]
    assert result["fused"] is compiler
    if compiler:
        assert result["log_warnings"] == [] and result["py_warnings"] == []
    else:  # exactly one warning, one line, saying what happened
        assert len(result["log_warnings"]) == 1 and result["log_warning_lines"] == 1, result["log_warnings"]
        assert "fused CPU kernels unavailable" in result["log_warnings"][0]
        assert result["py_warnings"] == []
    verify = _run([str(venv / "bin" / "maxq"), "verify", str(work / "model.maxq")], cwd=work, env=env)
    assert "OK: 2/2 expected layers are 2:4" in verify.stdout + verify.stderr
