"""Fine-tuning a trained model (``maxq train --init``): the accuracy before any step, and the recipe file."""

from pathlib import Path

import pytest

from maxq.core.config import config_options
from maxq.train.loop import train
from maxq.train.recipe import METHODS, TrainConfig, load_yaml

from ..conftest import one_thread

ROOT = Path(__file__).resolve().parents[2]


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cnn_small", epochs=1, batch_size=64, out=str(out), progress=False)
    return TrainConfig(**{**base, "threads": 1, **kw})


def test_init_records_the_accuracy_before_any_step_and_keeps_it_on_resume(tmp_path):
    with one_thread():
        parent = train(_cfg(tmp_path / "dense", method="dense"))
        assert "before_finetune" not in parent  # no --init, nothing before the first step
        init = str(tmp_path / "dense" / "checkpoint.pt")
        # Every block dense and the soft factor phased in with the ramp: the first forward is the parent itself.
        ramp = dict(method="maxq", nm="1:16", soft_warmup="ramp", ramp=(0, 1), per_step=True, init=init, val_split=0.1)
        report = train(_cfg(tmp_path / "ramp", epochs=2, **ramp))
        before = report["before_finetune"]
        assert before["test_top1"] == parent["top1_last"] and set(before) == {
            "test_loss",
            "test_top1",
            "val_loss",
            "val_top1",
        }
        # The magnitude prune (oneshot) is what its first forward sees; it is measured, not the parent's.
        oneshot = train(_cfg(tmp_path / "oneshot", method="oneshot", nm="1:16", init=init))
        assert oneshot["before_finetune"]["test_loss"] != before["test_loss"]
        # Interrupted after epoch 1 and resumed: the number measured at the start is kept, not re-measured.
        out = tmp_path / "resumed"
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(out, epochs=2, **ramp), on_epoch_end=_stop_after_first)
        resumed = train(_cfg(out, epochs=2, resume=True, **ramp))
        assert resumed["before_finetune"] == before


def _stop_after_first(epoch, record, sparsifier):
    if epoch == 1:
        raise KeyboardInterrupt


def test_finetune_recipe_parses_validates_and_is_in_range():
    options = load_yaml(ROOT / "configs" / "finetune.yaml")
    for method in METHODS[:-1]:  # every sparse method takes the one file
        cfg = TrainConfig.from_dict({**options, "method": method, "init": "parent/checkpoint.pt"})
        sparse = cfg.sparsity_config()
        assert sparse.method == method
        if "ramp" in config_options(method):
            assert sparse.soft_warmup == "ramp" and sparse.per_step
            assert sparse.ramp == (0.0, cfg.epochs / 2)  # the first half of fine-tuning
    cfg = TrainConfig.from_dict({**options, "init": "parent/checkpoint.pt"})
    assert 0 < cfg.lr <= 0.02 and cfg.warmup_epochs < cfg.epochs  # a fine-tuning rate, below the parent's 0.1
    assert 1 <= cfg.epochs <= 10 and 0 < cfg.momentum < 1 and cfg.weight_decay < 1e-3
    assert (cfg.dataset, cfg.model, cfg.val_split) == ("fashion-mnist", "cnn_small", 0.1)
