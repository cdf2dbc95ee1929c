"""The PyTorch files maxq writes -- training checkpoints and folded models -- and the one place their formats live.

Written atomically and sealed; read with checks that say what is wrong before anything is touched.

**Seal** (integrity): a file is ``torch.save``'s zip archive whose zip comment is ``maxq-sha256:<64 hex digits>``,
the SHA-256 of every byte of the file before those 64 digits. Any changed byte is caught on read (the digest no
longer matches, or the archive's end record no longer parses), and the file stays an ordinary ``torch.load``-able
archive. Files without a seal (written by older maxq) load with a warning.

**Safe loading**: every file is read with ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples,
numbers, strings only, so a file from elsewhere cannot run code when it is read. maxq's own files hold nothing
else (RNG states are stored as tensors and ints).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "SHARDED_FORMAT",
    "FOLDED_FORMAT",
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "seal",
    "read_torch_file",
    "load_checkpoint",
    "save_sharded",
    "load_sharded",
    "load_folded",
    "folded_model",
    "HF_CONFIG_LAYOUT_KEY",
    "HF_CONV1D_LAYERS",
    "HF_CONV1D_MODEL_TYPES",
    "LIGHTNING_VERSION_KEY",
    "SAFETENSORS_LAYOUT_KEY",
    "hf_transposed",
    "read_hf_folder",
    "read_safetensors",
    "safetensors_header",
    "safetensors_ready",
    "save_safetensors",
    "InitWeights",
    "read_init",
    "load_init_",
]

log = logging.getLogger(__name__)

#: ``maxq train``'s ``checkpoint.pt``: model (masks not folded), optimizer, schedule, sparsifier, RNG, config.
CHECKPOINT_FORMAT = "maxq.checkpoint/1"
#: ``maxq train --fsdp``'s ``checkpoint.pt``: the loop's own state (config, epoch, schedule, each process's RNG,
#: history), naming the folder beside it that holds the sharded model, optimizer and sparsifier state
#: (``torch.distributed.checkpoint``), with the SHA-256 of each of that folder's files (see `save_sharded`).
SHARDED_FORMAT = "maxq.checkpoint-sharded/1"
#: a folded model (``model_folded.pt``, ``maxq export --folded``): state dict, N:M layout, architecture.
FOLDED_FORMAT = "maxq.folded/1"

_SEAL = b"maxq-sha256:"
_TRAILER = len(_SEAL) + 64  # the zip comment: marker + hex digest
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record (22 bytes + comment)


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, corrupt, unsafe, not ours, or for another run."""


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (library messages can span many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def seal(data: bytes | memoryview) -> list[bytes | memoryview]:
    """``torch.save`` output -> the pieces of the same archive with the SHA-256 zip comment (see the module
    docstring); written one after the other, so a large checkpoint is not copied in memory."""
    data = memoryview(data)
    if len(data) < 22 or data[-22:-18] != _EOCD or data[-2:] != b"\x00\x00":
        raise ValueError("seal() expects torch.save's zip archive (no comment)")
    comment = _TRAILER.to_bytes(2, "little") + _SEAL  # the comment length, then the comment up to the digest
    digest = hashlib.sha256(data[:-2])
    digest.update(comment)
    return [data[:-2], comment, digest.hexdigest().encode()]


def _check_seal(data: bytes, path: Path) -> bool:
    """True if ``data`` is sealed and intact, False if it carries no seal; ``CheckpointError`` if it was changed."""
    if data[-_TRAILER:].startswith(_SEAL):
        digest = hashlib.sha256(memoryview(data)[:-64]).hexdigest().encode()
        if data[-64:] != digest:
            raise CheckpointError(
                f"{path} is corrupt: its SHA-256 does not match the one written with it (the file changed after "
                f"it was saved); restore it from a copy or re-create it"
            )
        return True
    if data[:4] == b"PK\x03\x04" and (data[-22:-18] != _EOCD or data[-2:] != b"\x00\x00"):
        # A zip archive whose end is neither torch.save's nor a seal: cut short, or the seal itself was changed.
        raise CheckpointError(f"{path} is corrupt or truncated: its archive does not end as maxq writes it")
    return False


def _umask() -> int:
    """The process's umask (read by setting it back at once; the lock keeps threads of this module apart)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def atomic_write_bytes(data: bytes | list[bytes | memoryview], path: str | Path) -> None:
    """Write ``data`` (or its pieces, in order) to a temporary file in the same folder, fsync, then rename over
    ``path``: a crash leaves either the old file or the new one, never half of one. The file gets the mode a plain
    ``open(path, "w")`` would (0666 less the umask: 0644 under umask 022), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj``, sealed with its SHA-256, atomically (see `atomic_write_bytes`).

    ``obj`` must hold only tensors, dicts, lists, tuples, numbers, strings and ``None`` (what
    ``torch.load(weights_only=True)`` reads back)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(seal(buf.getbuffer()), path)


def _legacy_globals() -> list[Any]:
    """numpy types found in checkpoints of older maxq (RNG state): plain arrays, no code."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_torch_file(path: str | Path) -> Any:
    """The one reader of ``.pt`` files: seal checked, then ``torch.load(weights_only=True)`` on CPU.

    Raises:
        CheckpointError: missing, empty, truncated, changed since it was written (seal mismatch), or holding
            Python objects other than plain data (refused unread: unpickling them could run code). The message
            is one line and names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path} is empty")
    if data[:4] != b"PK\x03\x04" and data[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle
        raise CheckpointError(
            f"{path}: unknown file kind (not a PyTorch file; expected a maxq checkpoint, folded model or state dict)"
        )
    sealed = _check_seal(data, path)
    try:
        if sealed:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            with torch.serialization.safe_globals(_legacy_globals()):
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), _one_line(exc))
        raise CheckpointError(
            f"{path} refused: it holds Python objects that are not plain data ({detail.split(' was not')[0]}); "
            f"maxq files never do, and unpickling them could run code"
        ) from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path} cannot be read (corrupt or truncated?): {_one_line(exc)}") from None
    if not sealed and isinstance(obj, dict) and str(obj.get("format", "")).startswith("maxq."):
        log.warning("%s has no content hash (written by an older maxq): it cannot be checked for corruption", path)
    return obj


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...] = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by ``maxq train`` (or another ``kind`` of maxq torch file, or any
    of several kinds).

    Raises:
        CheckpointError: see `read_torch_file`; or not a ``kind`` file.
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    state = read_torch_file(path)
    if not isinstance(state, dict) or state.get("format") not in kinds:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {' or '.join(kinds)} file (found {found!r})")
    return state


# -- sharded checkpoints (maxq train --fsdp): torch.distributed.checkpoint folders -------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sharded_prefix(path: Path) -> str:
    """The name every sharded-state folder of the index ``path`` starts with (``checkpoint.pt`` ->
    ``checkpoint.sharded-``)."""
    return f"{path.stem}.sharded-"


def save_sharded(sharded: dict[str, Any], index: dict[str, Any], path: str | Path) -> None:
    """Save a sharded checkpoint; a collective: every process of the default group calls it with its own
    ``sharded`` state (DTensors and plain values, as ``torch.distributed.checkpoint.save`` takes it).

    Atomic: the state goes to a temporary folder beside ``path``; once every process has written its part and
    hashed a share of the files, rank 0 renames the folder to a fresh name, then writes ``index`` (plain data,
    `SHARDED_FORMAT`) to ``path`` with `atomic_save`, naming that folder and each of its files' SHA-256, and only
    then removes the folders of earlier checkpoints. A crash at any point leaves ``path`` naming a complete folder
    (the previous checkpoint's until the new index is in place)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = path.parent / f".{_sharded_prefix(path)}tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was interrupted
    dist.barrier()
    dcp.save(sharded, checkpoint_id=str(tmp))  # returns on every process once the metadata is written
    names = sorted(p.name for p in tmp.iterdir())
    mine = {name: _sha256_file(tmp / name) for name in names[rank::world]}
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    if rank == 0:
        files = {name: digest for share in shares for name, digest in share.items()}
        final = path.parent / f"{_sharded_prefix(path)}{index.get('epoch', 0)}-{secrets.token_hex(4)}"
        os.replace(tmp, final)
        _fsync_dir(path.parent)
        atomic_save({**index, "sharded": {"folder": final.name, "files": dict(sorted(files.items()))}}, path)
        for old in path.parent.glob(f"{_sharded_prefix(path)}*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(state: dict[str, Any], index: dict[str, Any], path: str | Path) -> None:
    """Load the sharded state the index ``index`` (read from ``path`` by `load_checkpoint`) names into ``state``
    (the same structure as saved, from this run's model, optimizer and sparsifier), in place; a collective.

    Every file is checked against its SHA-256 first (each process checks a share), so a changed or missing file
    is an error on every process before anything is loaded.

    Raises:
        CheckpointError: the folder or one of its files is missing, or a file changed since it was written.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    entry = index.get("sharded") or {}
    folder, files = path.parent / str(entry.get("folder", "")), dict(entry.get("files") or {})
    problems = []
    if not entry.get("folder") or not folder.is_dir():
        problems.append(f"{path} names the folder {folder}, which does not exist; the sharded state is lost")
    else:
        for name in sorted(files)[rank::world]:
            if not (folder / name).is_file():
                problems.append(f"{folder / name} is missing (the checkpoint is incomplete)")
            elif _sha256_file(folder / name) != files[name]:
                problems.append(
                    f"{folder / name} is corrupt: its SHA-256 does not match the one written with it (the file "
                    f"changed after it was saved); restore the run folder from a copy or start over"
                )
    found: list[Any] = [None] * world
    dist.all_gather_object(found, problems)
    problems = [p for share in found for p in share]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    dcp.load(state, checkpoint_id=str(folder))


def folded_file(state_dict: dict[str, Any], layout: Any, arch: dict[str, Any], config: dict | None) -> dict[str, Any]:
    """The content of a folded-model file (`FOLDED_FORMAT`); ``layout`` is an ``NMLayout`` or ``None``."""
    return {
        "format": FOLDED_FORMAT,
        "state_dict": state_dict,
        "layout": layout.to_dict() if layout is not None else None,
        "arch": arch,
        "config": config,
    }


def load_folded(path: str | Path):
    """Rebuild a folded model file (``model_folded.pt``); returns ``(model, file)``."""
    state = load_checkpoint(path, kind=FOLDED_FORMAT)
    return folded_model(state, path), state


def folded_model(state: dict[str, Any], source: str | Path = ""):
    """The model of an already-read folded file (`FOLDED_FORMAT`), with its layout attached."""
    from ..core.layout import LAYOUT_ATTR, NMLayout
    from .models import build_model

    arch = state["arch"]
    model = build_model(arch["model"], arch["in_channels"], arch["num_classes"], arch.get("image_size"))
    if arch.get("bn_folded"):
        from ..deploy.bnfold import fold_batchnorm_

        fold_batchnorm_(model)  # the same structure (BN -> Identity, conv biases); the weights come next
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{source} does not fit the model it names ({arch['model']}): {first}") from None
    if state.get("layout"):
        setattr(model, LAYOUT_ATTR, NMLayout.from_dict(state["layout"], str(source)))
    return model


# -- weight files from elsewhere: safetensors, Hugging Face model folders, Lightning checkpoints --------------------

#: safetensors header metadata key holding a `NMLayout` record (JSON), as
#: `save_safetensors` writes it; ``config.json`` of a Hugging Face folder may carry it as ``maxq_layout``.
SAFETENSORS_LAYOUT_KEY = "maxq.layout"
#: ``config.json`` key for the layout record (``model.config.maxq_layout = layout.to_dict()`` before
#: ``save_pretrained``).
HF_CONFIG_LAYOUT_KEY = "maxq_layout"
#: the key that marks a Lightning checkpoint (its weights are in ``ckpt["state_dict"]``).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def safetensors_header(path: str | Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or ``None`` if ``path`` does not start like one (no tensors read)."""
    import json

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        size = int.from_bytes(head, "little")
        if not 2 <= size <= 100_000_000:
            return None
        text = f.read(size)
    if text[:1] != b"{":
        return None
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file (safe by design: no code in the format).

    Raises:
        CheckpointError: missing, truncated or not a safetensors file (one line, naming the file).
    """
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    header = safetensors_header(path)
    if header is None:
        raise CheckpointError(f"{path} is not a safetensors file")
    try:
        tensors = load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for truncated / garbled files
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {_one_line(exc)}") from None
    meta = header.get("__metadata__") or {}
    return in_name_order(tensors), {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that orders the numbers inside names as numbers: ``layer.2`` before ``layer.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def in_name_order(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` ordered by name, numbers as numbers (``h.2`` before ``h.10``). A safetensors file does not keep
    the state dict's order (its reader returns the tensors in no fixed order), so reports list its layers in this
    one, the same on every read."""
    return {key: tensors[key] for key in sorted(tensors, key=_natural_key)}


def safetensors_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` detached, on the CPU and contiguous, as safetensors stores them: it refuses tensors that share
    memory (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``), so every tensor after the first on a storage is a
    copy."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, layout: Any = None) -> None:
    """Write a (folded) state dict as safetensors, atomically, with ``layout`` (an ``NMLayout``) in the header
    metadata under `SAFETENSORS_LAYOUT_KEY`, so ``maxq verify`` knows which layers are N:M. Tensors sharing
    memory (tied weights) are stored as copies."""
    import json

    from safetensors.torch import save

    tensors = safetensors_ready(state_dict)
    meta = {"format": "pt"}
    if layout is not None:
        meta[SAFETENSORS_LAYOUT_KEY] = json.dumps(layout.to_dict())
    atomic_write_bytes(save(tensors, metadata=meta), path)


def read_hf_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """Weights of a Hugging Face model folder (``save_pretrained``): ``config.json`` plus ``model.safetensors``,
    sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``, or ``pytorch_model.bin``
    (sharded likewise; read with ``weights_only=True``). Returns ``(tensors, config, metadata of the first
    safetensors file)``.

    Raises:
        CheckpointError: no config.json, no weights, an index naming a missing shard, or an unreadable file.
    """
    import json

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: no readable config.json ({_one_line(exc)})") from None
    files: list[Path] = []
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / single).is_file():
            files = [path / single]
        elif (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
                files = [path / name for name in dict.fromkeys(weight_map.values())]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{path / index} is not a valid shard index ({_one_line(exc)})") from None
        if files:
            break
    if not files:
        raise CheckpointError(
            f"{path}: a Hugging Face folder without model.safetensors, pytorch_model.bin or a shard index"
        )
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] | None = None
    for file in files:
        if file.suffix == ".safetensors":
            part, part_meta = read_safetensors(file)
            meta = part_meta if meta is None else meta
        else:
            part = read_torch_file(file)
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise CheckpointError(f"{file}: not a state dict of tensors")
        tensors.update(part)
    if files[0].suffix == ".safetensors":  # no order kept across shards either: by name, as for one file
        tensors = in_name_order(tensors)
    return tensors, config, meta or {}


#: Hugging Face ``model_type`` values whose linear layers are ``Conv1D`` (weights stored ``[in, out]``), and the
#: layer names that are Conv1D in them (GPT-2, GPT-1, ImageGPT and Decision Transformer blocks).
HF_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
HF_CONV1D_LAYERS = r"(^|\.)(c_attn|q_attn|c_fc|c_proj)$"


def hf_transposed(config: dict[str, Any], names: list[str]) -> list[str]:
    """Which of the layer ``names`` of a Hugging Face folder are ``Conv1D`` (``[in, out]`` weights): those matching
    `HF_CONV1D_LAYERS` when ``config["model_type"]`` is in `HF_CONV1D_MODEL_TYPES`, else none."""
    import re

    if config.get("model_type") not in HF_CONV1D_MODEL_TYPES:
        return []
    return [name for name in names if re.search(HF_CONV1D_LAYERS, name)]


@dataclass
class InitWeights:
    """Weights to start a run from (``maxq train --init``): a plain state dict, where it came from, and the
    ``--model`` it was trained with when the file records it."""

    state_dict: dict[str, Any]
    source: Path
    kind: str  # checkpoint, folded or state_dict
    model: str | None = None


def read_init(path: str | Path) -> InitWeights:
    """Read what ``--init`` accepts: a run folder (its ``checkpoint.pt``; a sparse run's ``model_folded.pt``), a
    training checkpoint, a folded model file, or a plain ``torch.save(model.state_dict())``; all read with
    ``weights_only=True``.

    Raises:
        CheckpointError: missing, unreadable or unsafe (see `read_torch_file`), another kind of file, a run
            folder without a checkpoint, or a checkpoint that still holds masks (use the run's folded model).
    """
    path = Path(path)
    if path.is_dir():
        checkpoint, folded = path / "checkpoint.pt", path / "model_folded.pt"
        if not checkpoint.is_file() and not folded.is_file():
            raise CheckpointError(
                f"--init {path} is a folder but not a maxq run (it holds neither checkpoint.pt nor model_folded.pt)"
            )
        try:
            found = read_init(checkpoint if checkpoint.is_file() else folded)
        except _ShardedInit:
            if folded.is_file():  # a finished --fsdp run: its weights, whole
                return read_init(folded)
            raise
        if _has_masks(found.state_dict) and folded.is_file():  # a sparse run: start from its shipped weights
            return read_init(folded)
        return found
    if not path.exists():
        raise CheckpointError(f"--init {path} does not exist")
    state = read_torch_file(path)
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt == CHECKPOINT_FORMAT:
        arch = state.get("arch") or {}
        weights = InitWeights(dict(state["model"]), path, "checkpoint", arch.get("model") or state["config"]["model"])
    elif fmt == SHARDED_FORMAT:
        raise _ShardedInit(
            f"--init {path}: a sharded checkpoint (maxq train --fsdp) holds its weights in shards; pass its run's "
            f"model_folded.pt (written when the run finishes)"
        )
    elif fmt == FOLDED_FORMAT:
        weights = InitWeights(dict(state["state_dict"]), path, "folded", (state.get("arch") or {}).get("model"))
    elif isinstance(state, dict) and state and fmt is None and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights = InitWeights(dict(state), path, "state_dict")
    else:
        what = f"a {fmt!r} file" if fmt else f"a {type(state).__name__} that is not a state dict"
        raise CheckpointError(
            f"--init {path}: unknown file kind ({what}); pass a run folder, checkpoint.pt, model_folded.pt or a "
            f"state dict saved with torch.save(model.state_dict())"
        )
    if _has_masks(weights.state_dict):
        raise CheckpointError(
            f"--init {path}: this checkpoint still holds masks (a sparse run); use its run's model_folded.pt"
        )
    return weights


class _ShardedInit(CheckpointError):
    """``--init`` was given a sharded checkpoint's index (a run folder then falls back to its folded model)."""


def _has_masks(state_dict: dict[str, Any]) -> bool:
    return any(".parametrizations." in k for k in state_dict)


def load_init_(model: torch.nn.Module, init: InitWeights, model_name: str) -> None:
    """Load ``init`` into ``model`` (built as ``--model model_name``); every key and shape must match.

    Raises:
        CheckpointError: one line saying which keys are missing or unexpected and which shapes differ (the first
            few, with counts), and the ``--model`` the file was trained with when it records it.
    """
    have = model.state_dict()
    given = init.state_dict
    missing = [k for k in have if k not in given]
    unexpected = [k for k in given if k not in have]
    shapes = [
        f"{k} {_shape(given[k])} vs {_shape(have[k])}"
        for k in have
        if k in given and isinstance(given[k], torch.Tensor) and given[k].shape != have[k].shape
    ]
    problems = [
        _listed(f"{len(missing)} missing", missing),
        _listed(f"{len(unexpected)} unexpected", unexpected),
        _listed(f"{len(shapes)} of other shape (file vs model)", shapes),
    ]
    problems = [p for p in problems if p]
    if problems:
        trained = f"; it was trained with --model {init.model}" if init.model and init.model != model_name else ""
        raise CheckpointError(
            f"--init {init.source} ({init.kind}) does not fit --model {model_name}: keys {'; '.join(problems)}{trained}"
        )
    model.load_state_dict(given)


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _listed(what: str, items: list[str], first: int = 3) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - first} more)" if len(items) > first else ""
    return f"{what}: {', '.join(items[:first])}{more}"
