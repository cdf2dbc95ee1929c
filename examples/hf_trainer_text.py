"""Train a small BERT to 2:4 sparsity with the Hugging Face Trainer and maxq's MaxQ callback (offline, CPU).

The task is generated in code, so nothing is downloaded: short sentences built from templates, labelled
*positive* or *negative* by the sentiment words they contain ("the service was great but slow" -> positive when
the positive words outnumber the negative ones). A word-level tokenizer (``tokenizers`` WordLevel) is built from
the generated vocabulary. The model is a ``BertForSequenceClassification`` built from a small ``BertConfig``.

What happens:

1. ``MaxQCallback(MaxQConfig(n=2, m=4, ramp=(0, R)))`` is passed to ``Trainer(callbacks=[...])``; it
   sparsifies the model's Linear layers as the Trainer is created.
2. ``trainer.train()``: the MaxQ ramp takes the share of blocks still dense from 1 to 0 over ``R`` epochs, the
   SR-STE decay acts on true gradients, masks follow the weights every optimizer step; each epoch logs
   ``maxq/dense_fraction`` and ``maxq/mean_soft_scale`` with the Trainer's own logs.
3. At the end the callback folds the masks into the weights and checks that every sparsified layer is exactly
   2:4; ``trainer.save_model(DIR)`` writes an ordinary Hugging Face model folder.
4. The folder is reloaded with ``AutoModelForSequenceClassification.from_pretrained`` (no maxq involved) and
   checked: same predictions, exactly 2:4, accuracy on held-out sentences well above chance (50%).

Usage::

    python examples/hf_trainer_text.py                # ~1-2 minutes on 2 CPU cores
    python examples/hf_trainer_text.py --quick        # a few seconds (what the test suite runs)
    python examples/hf_trainer_text.py --out runs/bert24 --epochs 8 --ramp 4

Resume an interrupted run with ``--resume`` (the Trainer's last checkpoint in ``--out``; the sparsifier's
state travels in it).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import logging
import random
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import maxq
from maxq.integrations.hf import MaxQCallback

POSITIVE = ["great", "good", "excellent", "friendly", "fast", "tasty", "lovely", "clean", "helpful", "fresh"]
NEGATIVE = ["bad", "awful", "slow", "rude", "cold", "dirty", "bland", "noisy", "stale", "poor"]
NEUTRAL = ["food", "service", "staff", "room", "place", "coffee", "menu", "table", "music", "price", "view"]
TEMPLATES = [
    "the {n} was {a}",
    "the {n} was {a} and the {n} was {a}",
    "the {n} was {a} but the {n} was {a}",
    "really {a} {n} and {a} {n}",
    "i found the {n} {a} , the {n} {a} and the {n} {a}",
    "{a} {n} , {a} {n}",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
MAX_LEN = 24


def make_sentences(count: int, seed: int) -> list[tuple[str, int]]:
    """Sentences with as many adjectives as the template has slots; the label is the majority sentiment."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        template = rng.choice(TEMPLATES)
        slots = template.count("{a}")
        words = [rng.choice(POSITIVE + NEGATIVE) for _ in range(slots)]
        positive = sum(w in POSITIVE for w in words)
        if 2 * positive == slots:
            continue  # a tie has no label
        text = template
        for w in words:
            text = text.replace("{n}", rng.choice(NEUTRAL), 1).replace("{a}", w, 1)
        out.append((text, int(2 * positive > slots)))
    return out


def make_tokenizer() -> Tokenizer:
    words = sorted({w for t in TEMPLATES for w in t.split() if "{" not in w} | set(POSITIVE + NEGATIVE + NEUTRAL))
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[tuple[str, int]], tokenizer: Tokenizer) -> None:
        ids = torch.zeros(len(pairs), MAX_LEN, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (text, _) in enumerate(pairs):
            tokens = [SPECIAL.index("[CLS]"), *tokenizer.encode(text).ids][:MAX_LEN]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        self.ids, self.mask = ids, mask
        self.labels = torch.tensor([label for _, label in pairs])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def accuracy(model: torch.nn.Module, data: TextDataset) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.ids, attention_mask=data.mask).logits
    return float((logits.argmax(-1) == data.labels).float().mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run folder (checkpoints, final model); default: a temp dir")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--ramp", type=float, default=2, help="MaxQ ramp end in epochs (default 2)")
    parser.add_argument("--train-size", type=int, default=1536, help="training sentences (default 1536)")
    parser.add_argument("--quick", action="store_true", help="a few-second run (test suite): tiny data, 2 epochs")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.ramp, args.train_size = 2, 1, 256
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("maxq").setLevel(logging.INFO)
    out = args.out or tempfile.mkdtemp(prefix="maxq-hf-")

    tokenizer = make_tokenizer()
    train = TextDataset(make_sentences(args.train_size, args.seed), tokenizer)
    test = TextDataset(make_sentences(512, args.seed + 1), tokenizer)
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_LEN,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)

    callback = MaxQCallback(maxq.MaxQConfig(n=2, m=4, ramp=(0, args.ramp)))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=32,
            learning_rate=2e-3,
            warmup_steps=10,
            weight_decay=0.01,
            logging_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=1,
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        ),
        train_dataset=train,
        callbacks=[callback],
    )
    layers = callback.sparsifier.layers
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trained = accuracy(trainer.model, test)

    final = os.path.join(out, "final")
    trainer.save_model(final)
    reloaded = AutoModelForSequenceClassification.from_pretrained(final)
    check = maxq.check_nm(reloaded, 2, 4, layers)
    reloaded_accuracy = accuracy(reloaded, test)
    print(f"\nsaved to {final}: {len(layers)} layers, 2:4 exact: {check.ok}")
    print(f"test accuracy: {reloaded_accuracy:.3f} (after training {trained:.3f}; chance 0.5)")
    if not check.ok or reloaded_accuracy != trained:
        raise SystemExit("the reloaded model is not the trained 2:4 model")
    return {"accuracy": reloaded_accuracy, "layers": len(layers)}


if __name__ == "__main__":
    main()
