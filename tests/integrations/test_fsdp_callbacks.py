"""The Lightning and Hugging Face callbacks on a model sharded with FSDP2 (``fully_shard``), 2 CPU processes with
gloo (``fsdp_callbacks_worker.py`` under torchrun; the frameworks' own FSDP strategies need CUDA, so their hooks
are driven by hand, and scripts/gpu_check.sh's fsdp stage runs the real ones): masks and weights equal an
unsharded DDP run on the same global batches, the callbacks' checkpoint state resumes exactly, the fold leaves an
ordinary full state dict that is exactly N:M, and the report matches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import maxq

from .. import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fsdp")]

WORKER = Path(__file__).with_name("fsdp_callbacks_worker.py")
MODES = ("lightning", "hf")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")

    def make(out: Path) -> None:
        proc = torchrun.run([str(WORKER), ",".join(MODES), str(out)], env=env, clean=[out])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    env = dict(os.environ, OMP_NUM_THREADS="1", MAXQ_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH", "")])
    out = torchrun.once(tmp_path_factory, "fsdp_callbacks", make)

    def load(mode: str, rank: int = 0) -> dict:
        return torch.load(out / f"{mode}_rank{rank}.pt", weights_only=False)

    return load


@pytest.mark.parametrize("mode", MODES)
def test_sharded_callback_equals_ddp_on_the_same_global_batches(runs, mode):
    for rank in (0, 1):
        result = runs(mode, rank)
        for step in result["steps"]:
            assert step["masks_equal"], (rank, step["step"])
            assert step["param_diff"] == 0.0, (rank, step["step"], step["param_diff"])
        assert [s["step"] for s in result["steps"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_state_resumes_exactly_under_sharding(runs, mode):
    """Saved after two steps (Lightning: the callbacks' state written by rank 0 alone, as ModelParallelStrategy
    does; HF: the callback's file in the checkpoint folder), loaded into a new model and callback: the last two
    steps give the uninterrupted run's masks and weights, on both ranks (each rank's rows came back)."""
    for rank in (0, 1):
        result = runs(mode, rank)
        resumed = result["resumed"]
        assert resumed["masks_equal"] and resumed["param_diff"] == 0.0, (rank, resumed["param_diff"])
        assert resumed["step"] == 4 and resumed["progress"] == pytest.approx(2.0)
        saved = result["steps"][1]["masks"]
        assert all(torch.equal(saved[k], result["at_load"][k]) for k in saved)
        folded, again = result["folded"], result["resumed_folded"]
        assert all(torch.equal(folded[k], again[k]) for k in folded)
    if mode == "hf":
        assert runs(mode)["state_file"]
    else:
        assert runs(mode)["layout"]["layers"] == ["net.0", "net.3", "net.5"]


@pytest.mark.parametrize("mode", MODES)
def test_fold_at_train_end_leaves_an_ordinary_full_state_dict_exactly_nm(runs, mode):
    result = runs(mode)
    folded, reference = result["folded"], result["ref_folded"]
    assert result["check_ok"]
    assert not any(".parametrizations." in k for k in folded) and set(folded) == set(reference)
    assert all(torch.equal(folded[k], reference[k]) for k in reference)
    layers = [row[0] for row in result["report"][1]]
    check = maxq.check_nm(folded, 2, 4, layers=layers)
    assert check.ok and len(check.expected) == len(layers) >= 3, str(check)


@pytest.mark.parametrize("mode", MODES)
def test_report_under_sharding_equals_the_unsharded_one(runs, mode):
    sharded, reference = runs(mode)["report"]
    assert sharded == reference and all(row[2] == "2:4" and row[3] == 0.0 for row in sharded)
    if mode == "lightning":
        metrics, ref_metrics = runs(mode)["metrics"]
        assert metrics == ref_metrics and metrics["maxq/dense_fraction"] == 0.0


def test_hf_conv1d_sharded_on_its_inputs_is_refused_when_training_begins(runs):
    """accelerate's FSDP2 shards every weight on dim 0, a Conv1D's inputs: refused before the first step, with
    what to do instead."""
    message = runs("hf")["conv1d_refused"]
    assert "Shard(1)" in message and "c_attn" in message and "shard it yourself before creating the Trainer" in message
