"""A tiny BERT, a learnable synthetic text task and a Trainer factory for the Hugging Face tests (offline, CPU).

Also a script: ``python tests/integrations/hf_setup.py DIR RANK_FILE`` trains 2 epochs (run it under torchrun) and
saves this rank's weights and masks to ``RANK_FILE`` with the rank's number appended.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")

import hashlib
import sys
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

VOCAB = 40
SEQ = 8


class WordsDataset(torch.utils.data.Dataset):
    """Sequences of word ids; the label is 1 when word 5 or word 6 appears (learnable by a tiny BERT)."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(7, VOCAB, (n, SEQ), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        where = torch.randint(1, SEQ, (n,), generator=g)
        word = torch.randint(5, 7, (n,), generator=g)
        self.ids[flip, where[flip]] = word[flip]
        self.ids[:, 0] = 2  # [CLS]
        self.labels = flip.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def training_args(out: str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": out,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 3,
        "learning_rate": 2e-3,
        "save_strategy": "steps",
        "save_steps": 5,
        "logging_strategy": "epoch",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(out: str, callbacks: list | None = None, n: int = 64, **overrides: Any) -> Trainer:
    return Trainer(
        model=tiny_bert(),
        args=training_args(out, **overrides),
        train_dataset=WordsDataset(n),
        callbacks=callbacks,
    )


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]


class Recorder(TrainerCallback):
    """Per optimizer step: global step, progress, dense fraction, step count and mask checksums of a sparsifier."""

    def __init__(self, maxq_callback) -> None:
        self.maxq = maxq_callback
        self.rows: dict[int, tuple] = {}

    def _row(self, state) -> tuple:
        sp = self.maxq.sparsifier
        masks = tuple(checksum(m) for _, m in sp.named_masks())
        return (sp.progress, sp.dense_fraction, sp.steps, masks)

    def on_step_begin(self, args, state, control, **kwargs):
        self.rows[state.global_step + 0.5] = self._row(state)  # as the step begins (after the ramp moved)

    def on_substep_end(self, args, state, control, **kwargs):
        self.rows[state.global_step + 0.25] = self._row(state)  # after a micro-batch that did not step

    def on_step_end(self, args, state, control, **kwargs):
        self.rows[state.global_step] = self._row(state)  # after the step (masks of the updated weights)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":  # torchrun: python hf_setup.py OUT RESULT_PREFIX
    from maxq import MaxQConfig
    from maxq.integrations.hf import MaxQCallback

    out, prefix = sys.argv[1], sys.argv[2]
    callback = MaxQCallback(MaxQConfig(n=2, m=4, ramp=(0, 1)), fold=False)
    trainer = make_trainer(
        out,
        [callback],
        num_train_epochs=2,
        save_strategy="no",
        per_device_train_batch_size=4,
        ddp_find_unused_parameters=False,
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    masks = {name: m.clone() for name, m in callback.sparsifier.named_masks()}
    torch.save(
        {"weights": weights(trainer.model), "masks": masks, "steps": callback.sparsifier.steps}, f"{prefix}{rank}"
    )
