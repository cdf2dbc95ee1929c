"""``maxq export``: from a trained run to verified deployable files.

Fold the masks (done by :func:`maxq.deploy.artifacts.model_from`), optionally fold BatchNorm, verify N:M, then
write the requested artifacts: a folded PyTorch file, the compressed N:M file (checked to restore bit-exactly)
and ONNX (checked against PyTorch with onnxruntime and by ``maxq verify``). Nothing is written unless the model
verifies.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.check import NMCheck, check_nm
from ..core.fold import nm_layout
from ..train.checkpoint import atomic_save, folded_file
from .bnfold import fold_batchnorm_

__all__ = ["ExportResult", "ONNX_TOLERANCE", "export_model"]

log = logging.getLogger(__name__)

#: largest accepted ``max |onnxruntime - torch| / output scale`` for an FP32 ONNX export.
ONNX_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What :func:`export_model` checked and wrote; ``ok`` is false if a check failed (then nothing more is
    written after it)."""

    check: NMCheck
    summary: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    problem: str = ""


def _dense_bytes(state: dict[str, torch.Tensor]) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()  # a folded state dict stores its zeros: the dense size


def export_model(
    model: nn.Module,
    arch: dict[str, Any],
    *,
    source: str = "",
    bn_fold: bool = False,
    folded: str | Path | None = None,
    compressed: str | Path | None = None,
    onnx: str | Path | None = None,
) -> ExportResult:
    """Verify a folded model and write the requested artifacts.

    Args:
        model: folded (mask-free) model carrying its layout (``maxq.nm_layout``).
        arch: how to rebuild it (model name, input channels, classes, image size); stored in the files.
        bn_fold: fold BatchNorm into the preceding convs first (keeps the pattern).
        folded, compressed, onnx: output paths (``None``: not written).

    Raises:
        ValueError: the model carries no N:M layout, or a compressed file does not restore bit-exactly.
    """
    model.eval()
    layout = nm_layout(model)
    if layout is None:
        raise ValueError(f"{source or 'the model'} holds no N:M layout (a dense run?): nothing to verify")
    summary: dict[str, Any] = {"source": source, "n": layout.n, "m": layout.m, "layers": list(layout.layers)}
    if bn_fold:
        pairs = fold_batchnorm_(model)
        arch = {**arch, "bn_folded": True}
        summary["bn_folded"] = [f"{conv} <- {bn}" for conv, bn in pairs]
    check = check_nm(model, layout.n, layout.m)
    summary["nm_ok"] = check.ok
    result = ExportResult(check, summary)
    if not check.ok:
        result.ok, result.problem = False, f"{source or 'the model'} is not {layout.pattern}; nothing written"
        return result
    state = model.state_dict()
    summary["dense_file_bytes"] = _dense_bytes(state)
    arch = {**arch, "method": layout.method}
    if folded:
        atomic_save(folded_file(state, layout, arch, None), folded)
        summary["folded"] = {"path": str(folded)}
    if compressed:
        from .compress import load_compressed, save_compressed

        info = save_compressed(state, compressed, layout.n, layout.m, layout.layers, arch=arch)
        restored = load_compressed(compressed)
        exact = restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
        if not exact:
            raise ValueError(f"{compressed} does not restore the weights bit-exactly (please report this)")
        summary["compressed"] = {**info.to_dict(), "path": str(compressed), "bit_exact": exact}
    if onnx:
        from .onnx_export import export_onnx, onnx_parity
        from .verify import verify_file

        example = torch.randn(1, arch["in_channels"], arch["image_size"], arch["image_size"])
        sparse = export_onnx(model, onnx, example, n=layout.n, m=layout.m)
        diffs = onnx_parity(model, onnx, example)
        onnx_check, _, _ = verify_file(onnx)
        summary["onnx"] = {
            "path": str(onnx),
            "max_abs_diff": diffs,
            "sparse_initializers": len(sparse),
            "nm_ok": onnx_check.ok,
        }
        if max(diffs.values()) > ONNX_TOLERANCE or not onnx_check.ok:
            result.ok, result.problem = False, "the ONNX file does not match PyTorch or is not N:M"
    return result
