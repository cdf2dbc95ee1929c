"""maxq under FSDP2 (``fully_shard``), 2 CPU processes with gloo (``fsdp_worker.py`` under torchrun): every method,
sparsified before and after sharding, equals a DDP run on the same batches (masks bit for bit, weights too); the
mask state is sharded like the weights; folding gives an ordinary full state dict, exactly N:M; a DCP checkpoint
resumes in fresh processes exactly, and loads at world size 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import maxq

from .. import torchrun
from . import fsdp_worker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fsdp")]

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _torchrun(modes: str, out: Path, processes: int = 2) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MAXQ_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    if processes == 1:
        cmd = [sys.executable, str(WORKER), modes, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    else:  # each mode is a function of what the earlier ones left: a retry writes the same files again
        proc = torchrun.run([str(WORKER), modes, str(out)], env=env, processes=processes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("transformers")

    def make(out: Path) -> None:
        _torchrun("compare,conv1d,save", out)
        _torchrun("resume", out)  # fresh processes
        _torchrun("load1", out, processes=1)  # world size 1, no FSDP

    out = torchrun.once(tmp_path_factory, "fsdp", make)

    def load(name: str, rank: int = 0):
        return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)

    return load


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("method", list(fsdp_worker.METHODS))
def test_sharded_training_equals_ddp(runs, method, order):
    for rank in (0, 1):
        result = runs("compare", rank)[f"{method}-{order}"]
        for step in result["steps"]:
            assert step["masks_equal"], (rank, step)
            assert step["param_diff"] <= 1e-6, (rank, step)
            assert step["loss"][0] == pytest.approx(step["loss"][1], abs=1e-6)
        assert result["report_layers"] == ["2", "5", "9"]
        assert result["coded"] == (["2", "5", "9"] if method == "srste_1_8" else [])  # 1:8: kept-index codes


@pytest.mark.parametrize("method", list(fsdp_worker.METHODS))
def test_each_rank_holds_its_rows_of_the_mask_state(runs, method):
    """The bit planes are sharded like the weights: each rank holds about half of a single process's."""
    for rank in (0, 1):
        result = runs("compare", rank)[f"{method}-before"]
        for layer, single in result["single_mask_bytes"].items():
            held = result["mask_bytes"][layer]
            assert held < 0.75 * single, (rank, layer, held, single)


@pytest.mark.parametrize("method", list(fsdp_worker.METHODS))
def test_folded_full_state_dict_is_exactly_nm_and_loads_into_the_plain_model(runs, method):
    folded = runs("compare")[f"{method}-before"]["folded"]
    assert not any(".parametrizations." in k for k in folded)
    options = fsdp_worker.METHODS[method][1]
    check = maxq.check_nm(folded, options.get("n", 2), options.get("m", 4), layers=["2", "5", "9"])
    assert check.ok, str(check)
    plain = fsdp_worker.net()
    plain.load_state_dict(folded, strict=True)
    assert isinstance(plain[2], nn.Conv2d) and type(plain[2]) is nn.Conv2d


def test_conv1d_is_sharded_on_its_outputs_and_equals_ddp(runs):
    result = runs("conv1d")
    assert "Shard(1)" in result["refused"] and "inputs" in result["refused"]  # FSDP2's default split its inputs
    for step in result["steps"]:
        assert step["masks_equal"] and step["param_diff"] == 0.0, step


@pytest.mark.parametrize("method", fsdp_worker.CHECKPOINTED)
def test_dcp_checkpoint_resumes_exactly_in_fresh_processes(runs, method):
    for rank in (0, 1):
        saved, resumed = runs("save", rank)[method], runs("resume", rank)[method]
        assert resumed["losses"] == saved["losses"][2:]
        for a, b in zip(saved["masks"][2:], resumed["masks"]):
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(saved["params"][k], resumed["params"][k]) for k in saved["params"])


@pytest.mark.parametrize("method", fsdp_worker.CHECKPOINTED)
def test_dcp_checkpoint_loads_at_world_size_one(runs, method):
    saved, loaded = runs("save")[method], runs("load1")[method]
    assert all(torch.equal(saved["saved_masks"][k], loaded["masks"][k]) for k in loaded["masks"])
    assert all(torch.equal(saved["saved_params"][k], loaded["params"][k]) for k in saved["saved_params"])
    assert loaded["step"] == 2 and loaded["progress"] == pytest.approx(0.25)
