"""The Hugging Face callback's calibration option: a GPT-2 pruned by SparseGPT when the Trainer is created, then
fine-tuned with that mask fixed; and the option's errors."""

from __future__ import annotations

import os

import pytest
import torch

import maxq

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from maxq.integrations.hf import MaxQCallback  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


def test_trainer_calibrates_then_keeps_the_mask(tmp_path):
    model = gpt2()
    calibration_data = [{"input_ids": Tokens(seed=1).ids[i : i + 4]} for i in range(0, 16, 4)]
    callback = MaxQCallback(maxq.OneShotConfig(n=2, m=4), calibration="sparsegpt", calibration_data=calibration_data)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=4,
                                          learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True,
                                          disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    report = callback.calibration_report
    assert report.method == "sparsegpt" and len(report.pruned) == 8 and report.batches == 4
    survivors = {name: mask.bool().clone() for name, mask in callback.sparsifier.named_masks()}
    for row in report.pruned:
        weight = callback.sparsifier.model.get_submodule(row.name).parametrizations.weight.original
        assert row.kept_zeros or torch.equal(weight != 0, survivors[row.name])  # the calibrated survivors
    trainer.train()
    assert maxq.check_nm(model, 2, 4, list(survivors)).ok
    for name, kept in survivors.items():
        assert torch.equal(model.get_submodule(name).weight != 0, kept)  # fine-tuned with the mask fixed


def test_calibration_option_errors():
    with pytest.raises(ValueError, match="needs calibration_data"):
        MaxQCallback(maxq.OneShotConfig(), calibration="wanda")
    with pytest.raises(ValueError, match="without calibration"):
        MaxQCallback(maxq.OneShotConfig(), calibration_data=[])
    with pytest.raises(ValueError, match="calibrate_"):
        MaxQCallback(None, calibration="wanda", calibration_data=[])
    with pytest.raises(ValueError, match="same pattern"):
        MaxQCallback(maxq.OneShotConfig(n=2, m=4), calibration=maxq.CalibrationConfig(n=1, m=4), calibration_data=[])
    with pytest.raises(ValueError, match="unknown calibration method"):
        MaxQCallback(maxq.OneShotConfig(), calibration="obs", calibration_data=[])
