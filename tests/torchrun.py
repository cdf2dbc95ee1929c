"""Scripts under ``torchrun`` in the tests: 2 CPU processes (gloo), retried after a crash in gloo's C++ teardown.

Now and then on a loaded 2-core machine, a process dies at exit with ``terminate called without an active
exception`` (``std::terminate`` from a C++ thread, SIGABRT) after ``destroy_process_group``, its main thread past
all Python code: a race in PyTorch's process-group machinery (torch 2.14, gloo), not in the code under test, whose
failures are Python exceptions. Such a run is run again (three attempts in all), from clean output folders; any
other failure fails the test, and so does the third crash unless it came at interpreter exit, after the script's
own code had run. ``PYTHONFAULTHANDLER`` makes a crash print every Python thread's stack (where it happened).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pytest

TEARDOWN_CRASH = "terminate called without an active exception"


def executable() -> str:
    """The ``torchrun`` beside the interpreter running the tests (skips the test where there is none)."""
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("torchrun not installed next to the interpreter")
    return found


def command(args: Sequence[str], processes: int = 2) -> list[str]:
    """``torchrun --standalone --nproc-per-node=<processes> <args>``: a free port found by torchrun itself."""
    return [executable(), "--standalone", f"--nproc-per-node={processes}", *args]


def crashed_in_teardown(output: str) -> bool:
    return TEARDOWN_CRASH in output


def crashed_after_the_script(output: str) -> bool:
    """The crash came at interpreter exit, after the script's own code had run: no Python traceback before it, and
    the crashing thread's stack (faulthandler's dump) holds no Python frame."""
    at = output.find(TEARDOWN_CRASH)
    return at >= 0 and "Traceback (most recent call last)" not in output[:at] and "<no Python frame>" in output[at:]


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    processes: int = 2,
    timeout: float = 600,
    cwd: Path | None = None,
    clean: Iterable[Path] = (),
) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) under torchrun; output captured as text.

    ``clean``: folders the run writes, put back as they were before a retry (removed, or emptied where they
    existed before the first attempt): a run refuses, or builds on, what an earlier attempt left.
    """
    cmd = command(args, processes)
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    existed = {Path(folder): Path(folder).exists() for folder in clean}
    attempts = 3
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or not crashed_in_teardown(output):
            return proc
        if attempt == attempts:
            if crashed_after_the_script(output):  # the work was done; only the exit crashed, every time
                warnings.warn(f"torchrun: {TEARDOWN_CRASH!r} at exit, {attempts} times; taken as done", stacklevel=2)
                return subprocess.CompletedProcess(proc.args, 0, proc.stdout, proc.stderr)
            return proc
        tail = output[-4000:]
        message = f"torchrun: {TEARDOWN_CRASH!r} (gloo, C++); running it once more. Its output:\n{tail}"
        warnings.warn(message, stacklevel=2)
        for folder, was_there in existed.items():
            shutil.rmtree(folder, ignore_errors=True)
            if was_there:
                folder.mkdir(parents=True)
    raise AssertionError("unreachable")


def once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``make`` fills, made once per test process and reused after.

    pytest-xdist tears a module's fixtures down when a worker does not yet know its next test, and sets them up
    again for the module's next test: without this, a fixture's torchrun runs (tens of seconds) ran twice.
    """
    folder = tmp_path_factory.getbasetemp() / f"once-{name}"
    done = folder / ".done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        make(folder)
        done.touch()
    return folder
