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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "FOLDED_FORMAT",
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "seal",
    "read_torch_file",
    "load_checkpoint",
    "load_folded",
    "folded_model",
]

log = logging.getLogger(__name__)

#: ``maxq train``'s ``checkpoint.pt``: model (masks not folded), optimizer, schedule, sparsifier, RNG, config.
CHECKPOINT_FORMAT = "maxq.checkpoint/1"
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


def atomic_write_bytes(data: bytes | list[bytes | memoryview], path: str | Path) -> None:
    """Write ``data`` (or its pieces, in order) to a temporary file in the same folder, fsync, then rename over
    ``path``: a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
    """``torch.save`` ``obj``, sealed with its SHA-256, atomically (see :func:`atomic_write_bytes`).

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


def load_checkpoint(path: str | Path, *, kind: str = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by ``maxq train`` (or another ``kind`` of maxq torch file).

    Raises:
        CheckpointError: see :func:`read_torch_file`; or not a ``kind`` file.
    """
    state = read_torch_file(path)
    if not isinstance(state, dict) or state.get("format") != kind:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {kind} file (found {found!r})")
    return state


def folded_file(state_dict: dict[str, Any], layout: Any, arch: dict[str, Any], config: dict | None) -> dict[str, Any]:
    """The content of a folded-model file (:data:`FOLDED_FORMAT`); ``layout`` is an ``NMLayout`` or ``None``."""
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
    """The model of an already-read folded file (:data:`FOLDED_FORMAT`), with its layout attached."""
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
