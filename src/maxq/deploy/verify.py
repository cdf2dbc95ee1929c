"""``maxq verify``: N:M compliance of any file maxq reads (see :mod:`maxq.deploy.artifacts`)."""

from __future__ import annotations

from pathlib import Path

from ..core.check import NMCheck, check_nm
from ..core.nm import parse_nm
from .artifacts import weights_from

__all__ = ["DENSE_NOTE", "verify_file"]

#: the note of a file that records a dense run (its check has no layers, so it is not ``ok``).
DENSE_NOTE = "dense run: no N:M layers to check"


def verify_file(path: str | Path, nm: str | None = None) -> tuple[NMCheck, str, str]:
    """Check the file's sparsified layers; returns ``(report, file kind, note)``.

    The pattern comes from the file (maxq files record it) or from ``nm``; a disagreement is an error. A dense
    run (without ``nm``) gives an empty report (not ``ok``: nothing in it is N:M) and :data:`DENSE_NOTE`.

    Raises:
        ValueError: no pattern known, or the file is unreadable (``CheckpointError`` / ``CompressedError``).
    """
    weights = weights_from(path)
    if nm is not None:
        n, m = parse_nm(nm)
        if weights.n is not None and (weights.n, weights.m) != (n, m):
            raise ValueError(f"{path} records {weights.n}:{weights.m}, not {n}:{m}")
    elif weights.n is not None:
        n, m = weights.n, weights.m
    elif weights.dense:
        return NMCheck(0, 0, [], "the file records a dense run"), weights.kind, DENSE_NOTE
    else:
        raise ValueError(f"{path} does not record its N:M pattern ({weights.kind}); pass --nm N:M")
    source = f"the {weights.kind} file's layout" if weights.layers is not None else None
    return check_nm(weights.tensors, n, m, layers=weights.layers, source=source), weights.kind, weights.note
