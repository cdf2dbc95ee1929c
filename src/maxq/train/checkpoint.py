"""The PyTorch files maxq writes -- training checkpoints and folded models -- and the one place their formats live.

Written atomically, read with checks that say what is wrong before anything is touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "FOLDED_FORMAT", "CheckpointError", "atomic_save", "load_checkpoint", "load_folded"]

#: ``maxq train``'s ``checkpoint.pt``: model (masks not folded), optimizer, schedule, sparsifier, RNG, config.
CHECKPOINT_FORMAT = "maxq.checkpoint/1"
#: a folded model (``model_folded.pt``, ``maxq export --folded``): state dict, N:M layout, architecture.
FOLDED_FORMAT = "maxq.folded/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, not ours, or for another run."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: a crash leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, *, kind: str = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by ``maxq train``.

    Raises:
        CheckpointError: missing, unreadable/corrupt, or not a ``kind`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from None
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
    from ..core.layout import LAYOUT_ATTR, NMLayout
    from .models import build_model

    state = load_checkpoint(path, kind=FOLDED_FORMAT)
    arch = state["arch"]
    model = build_model(arch["model"], arch["in_channels"], arch["num_classes"], arch.get("image_size"))
    if arch.get("bn_folded"):
        from ..deploy.bnfold import fold_batchnorm_

        fold_batchnorm_(model)  # the same structure (BN -> Identity, conv biases); the weights come next
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model it names ({arch['model']}): {exc}") from None
    if state.get("layout"):
        setattr(model, LAYOUT_ATTR, NMLayout.from_dict(state["layout"], str(path)))
    return model, state
