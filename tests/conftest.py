"""Shared test settings: deterministic, small, CPU; the fused kernels are exercised where they build."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

# One torch thread per test process, the subprocesses the tests start included (they inherit OMP_NUM_THREADS):
# the tests' models are tiny, `make test` runs two processes (pytest-xdist workers) on two cores, and more threads
# than free cores make OpenMP spin: a 3-epoch run took 57 s on two threads beside one busy core, 15 s on one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MAXQ_QUIET", "1")

PATTERNS = [(2, 4), (1, 4), (2, 8), (1, 16), (4, 8)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--dist loadgroup`` for pytest >= 9.2: send the tests of one ``xdist_group`` to one worker.

    pytest-xdist (3.8) names a test's group by appending ``@group`` to ``item._nodeid``, which pytest 9.2 no longer
    reads (a node's id is ``item._id``): the groups were silently ignored, so two-process torchrun tests ran beside
    each other and a group's module fixtures were made once per worker. Where xdist's suffix did not take, set it
    here, the same way its scheduler parses it.
    """
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers under --dist loadgroup
        return
    for item in items:
        marks = item.iter_markers("xdist_group")
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        if not names or item.nodeid.rfind("@") > item.nodeid.rfind("]"):
            continue
        nodeid = f"{item.nodeid}@{'_'.join(sorted(names))}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(nodeid)
        else:
            item._nodeid = nodeid


def fused_params() -> list:
    """Run a test with the eager path and, where they build, the fused CPU kernels."""
    from maxq._engine.kernels import cpu_kernels

    have = cpu_kernels() is not None
    return [
        pytest.param(False, id="eager"),
        pytest.param(True, id="fused", marks=pytest.mark.skipif(not have, reason="fused CPU kernels unavailable")),
    ]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``MAXQ_TEST_RESULTS=FILE`` (set by scripts/gpu_check.sh), append one JSON line per test as it ends, so
    a stage killed by its timeout still leaves the results so far."""
    path = os.environ.get("MAXQ_TEST_RESULTS")
    if not path or (report.when != "call" and report.passed):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2]
    else:
        message = "\n".join(report.longreprtext.splitlines()[-25:]) if report.failed else ""
    entry = {
        "test": report.nodeid,
        "outcome": f"error ({report.when})" if report.failed and report.when != "call" else report.outcome,
        "duration_s": round(report.duration, 3),
        "message": message,
        "properties": {k: v for k, v in report.user_properties},
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one torch thread, and stay fast on a busy machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished MaxQ 2:4 ``maxq train`` run on the synthetic set (cnn_small, 2 epochs, ~3 s on one thread,
    ~99 % test top-1). Shared: read it, or copy it before changing anything."""
    from maxq.train.loop import train
    from maxq.train.recipe import TrainConfig

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = TrainConfig(
        dataset="synthetic", model="cnn_small", epochs=2, batch_size=32, ramp=(0, 0.5), per_step=True,
        out=str(out), progress=False, threads=1,
    )  # fmt: skip
    with one_thread():  # train() sets the thread count process-wide: restored after
        train(cfg)
    return out
