"""``maxq verify``: N:M compliance of any file maxq reads (see `maxq.deploy.artifacts`).

Which layers must be N:M ([`verify_file`][maxq.deploy.verify.verify_file]):

1. ``layers`` (``--layers REGEX``): every 2-D/4-D weight whose layer name matches the regular expression;
2. else the file's layout record (maxq files; safetensors / HF / Lightning files that carry one);
3. else (no record, pattern from ``--nm``): nothing says which layers may stay dense, so every layer must be N:M
   or dense. A layer whose blocks all hold at most N nonzeros is N:M; a layer is found dense when at most 1 % of
   its blocks that are not entirely zero hold at most N nonzeros (a dense weight has almost none; zero rows such
   as a padding embedding do not count); any other layer is neither, and fails. The file passes when at least one
   layer is N:M and none is neither; the dense ones are listed as found dense, never as dense by design.

Weights stored ``[in, out]`` (HF Conv1D) are checked along dim 0: those the file (or its kind) says, or with
``transposed`` (``--transposed REGEX``), the 2-D weights whose layer name matches (this replaces the file's word).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.check import LayerCheck, NMCheck, check_nm
from ..core.nm import parse_nm
from .artifacts import weights_from

__all__ = ["DENSE_MAX_NM_SHARE", "DENSE_NOTE", "DETECTED_SOURCE", "verify_file"]

#: the note of a file that records a dense run (its check has no layers, so it is not ``ok``).
DENSE_NOTE = "dense run: no N:M layers to check"
#: where the expected layers come from when the file has no layout record and no ``--layers`` is given.
DETECTED_SOURCE = "no layout record: every layer not found dense"
#: without a record, a layer is found dense when at most this share of its blocks that are not all zero are N:M.
DENSE_MAX_NM_SHARE = 0.01


def _regex(text: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"{flag} {text!r} is not a regular expression ({exc})") from None


def verify_file(
    path: str | Path, nm: str | None = None, *, layers: str | None = None, transposed: str | None = None
) -> tuple[NMCheck, str, str]:
    """Check the file's N:M layers; returns ``(report, file kind, note)``.

    The pattern comes from the file (maxq files record it) or from ``nm``; a disagreement is an error. A dense
    run (without ``nm``) gives an empty report (not ``ok``: nothing in it is N:M) and `DENSE_NOTE`.
    ``layers`` and ``transposed`` are regular expressions over layer names (``re.search``); see the module doc.

    Raises:
        ValueError: no pattern known, a bad regular expression, ``layers`` matching nothing, or the file is
            unreadable (``CheckpointError`` / ``CompressedError``).
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
        raise ValueError(f"{path} does not record which layers are N:M ({weights.kind} file); pass --nm N:M")
    names = [
        key[: -len(".weight")]
        for key, t in weights.tensors.items()
        if key.endswith(".weight") and hasattr(t, "dim") and t.dim() in (2, 4)
    ]
    inputs_first = weights.transposed or []
    if transposed is not None:
        pattern = _regex(transposed, "--transposed")
        inputs_first = [name for name in names if pattern.search(name) and weights.tensors[f"{name}.weight"].dim() == 2]
    if layers is not None:
        pattern = _regex(layers, "--layers")
        expected = [name for name in names if pattern.search(name)]
        if not expected:
            raise ValueError(f"--layers {layers!r} matches no 2-D/4-D weight of {path}")
        report = check_nm(weights.tensors, n, m, expected, source=f"--layers {layers}", transposed=inputs_first)
    elif weights.layers is not None:
        source = f"the {weights.kind} file's layout"
        report = check_nm(weights.tensors, n, m, weights.layers, source=source, transposed=inputs_first)
    else:
        report = check_nm(weights.tensors, n, m, [], source=DETECTED_SOURCE, transposed=inputs_first)
        for layer in report.layers:
            _classify(layer, n, m)
    return report, weights.kind, weights.note


def _classify(layer: LayerCheck, n: int, m: int) -> None:
    """Without a record: the layer must be N:M unless it is found dense (see the module doc); sets its
    ``expected`` and note."""
    transposed = [part for part in layer.note.split("; ") if part.startswith("[in, out]")]
    nonzero_blocks = layer.groups - layer.zero_blocks
    nm_blocks = nonzero_blocks - layer.violations  # blocks with 1 to n nonzeros
    if layer.groups == 0:
        layer.expected = False
        return
    if layer.violations == 0:
        layer.expected, note = True, ""
    elif nm_blocks <= DENSE_MAX_NM_SHARE * nonzero_blocks:
        layer.expected, note = False, "found dense (no record says which layers are dense)"
    else:
        layer.expected = True
        note = (
            f"neither dense nor {n}:{m}: {nm_blocks} of {layer.groups} blocks are {n}:{m}, {layer.violations} are "
            "not (if it is meant to be dense, say which layers must be N:M with --layers)"
        )
    layer.note = "; ".join([note, *transposed] if note else transposed)
