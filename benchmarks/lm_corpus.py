"""The language-model study's corpus: the Python standard library source of the interpreter that runs it, split by
file, and a byte-level BPE tokenizer trained on its train split (docs/RESULTS.md §8).

* Files: ``Lib/**/*.py`` under ``sysconfig.get_paths()["stdlib"]``, without any ``test``/``tests``/``idle_test``
  folder and without ``site-packages``; paths relative to that folder, sorted.
* Split by file, deterministically: the first 8 bytes of SHA-256(relative path) modulo 100 -- below 90 train, below
  95 val, else test. A file never straddles two splits.
* Identity: ``files_sha256`` (SHA-256 of the sorted path list, one per line) and ``content_sha256`` (SHA-256 of
  every path and its file's SHA-256), recorded in every study record: another Python version is another corpus.
* Tokenizer: Hugging Face ``tokenizers`` byte-level BPE (GPT-2's scheme) trained on the train split only, with one
  special token ``<|endoftext|>`` appended after every file.
* Token streams: every split's files encoded and concatenated (file order: sorted paths), cached as int32 tensors
  next to the tokenizer, verified against the corpus and tokenizer hashes on every read.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Corpus:
    root: str  # the stdlib folder
    python: str  # the interpreter's version
    files: tuple[str, ...]  # relative paths, sorted
    files_sha256: str
    content_sha256: str

    def split(self, name: str) -> list[str]:
        return [f for f in self.files if split_of(f) == name]

    def describe(self) -> dict[str, object]:
        """What a record stores: no file list, its hashes and counts per split."""
        out = {k: v for k, v in asdict(self).items() if k != "files"}
        out["files"] = {name: len(self.split(name)) for name in SPLITS}
        return out


def split_of(relative: str) -> str:
    """``train`` / ``val`` / ``test`` from the file's relative path alone (90 / 5 / 5)."""
    bucket = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def stdlib_corpus(root: str | Path | None = None, limit: int | None = None) -> Corpus:
    """The corpus of the running interpreter (or of the stdlib folder ``root``). ``limit``: keep only the files
    whose relative path sorts in the first ``limit`` of every split (the ``--quick`` rehearsal)."""
    root = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not (EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
    )
    if not files:
        raise FileNotFoundError(f"no Python files under {root}: is it the standard library's folder?")
    if limit is not None:
        files = sorted(f for name in SPLITS for f in [f for f in files if split_of(f) == name][:limit])
    listing = hashlib.sha256("\n".join(files).encode()).hexdigest()
    content = hashlib.sha256()
    for f in files:
        content.update(f.encode() + b"\0" + hashlib.sha256((root / f).read_bytes()).digest())
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(str(root), version, tuple(files), listing, content.hexdigest())


def read_text(corpus: Corpus, relative: str) -> str:
    return (Path(corpus.root) / relative).read_bytes().decode("utf-8", errors="replace")


def train_tokenizer(corpus: Corpus, vocab_size: int, path: Path) -> str:
    """Train the byte-level BPE tokenizer on the train split and save it to ``path`` (written atomically);
    returns its SHA-256. Single-threaded, so the merges do not depend on the machine."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_text(corpus, f) for f in corpus.split("train")), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_streams(corpus: Corpus, tokenizer_path: Path, cache: Path) -> dict[str, torch.Tensor]:
    """Every split as one int32 token stream (files in sorted order, ``<|endoftext|>`` after each), from the cache
    in ``cache`` when it matches the corpus and the tokenizer, else encoded and cached (atomically)."""
    from tokenizers import Tokenizer

    key = {
        "files_sha256": corpus.files_sha256,
        "content_sha256": corpus.content_sha256,
        "tokenizer_sha256": sha256_of(tokenizer_path),
    }
    path = cache / "tokens.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if json.loads(saved["key"]) == key:
            return {name: saved[name] for name in SPLITS}
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos = tokenizer.token_to_id(EOS)
    streams = {}
    for name in SPLITS:
        ids: list[int] = []
        for f in corpus.split(name):
            ids += tokenizer.encode(read_text(corpus, f)).ids
            ids.append(eos)
        streams[name] = torch.tensor(ids, dtype=torch.int32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": json.dumps(key), **streams}, tmp)
    os.replace(tmp, path)
    return streams
