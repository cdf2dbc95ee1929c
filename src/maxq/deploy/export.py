"""``maxq export``: from a trained run to verified deployable files.

Fold the masks (done by [`maxq.deploy.artifacts.model_from`][maxq.deploy.artifacts.model_from]), optionally fold
BatchNorm, verify N:M, then write the requested artifacts: a folded PyTorch file, the compressed N:M file (checked to
restore bit-exactly), and ONNX in FP32 and FP16 (each checked against PyTorch with onnxruntime and by ``maxq verify``)
and INT8 (`maxq.deploy.quantize`; verified on its int8 weights). Nothing is written unless the model verifies, and no
existing file is replaced unless asked (``overwrite``).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.check import NMCheck, check_nm
from ..core.fold import nm_layout
from ..train.checkpoint import atomic_save, folded_file
from .bnfold import fold_batchnorm_

__all__ = ["ExportResult", "ONNX_TOLERANCE", "FP16_TOLERANCE", "check_outputs", "export_model"]

log = logging.getLogger(__name__)

#: largest accepted ``max |onnxruntime - torch| / output scale`` for an FP32 ONNX export.
ONNX_TOLERANCE = 1e-4
#: the same for an FP16 export (fp16 keeps ~3 decimal digits; errors add up over the layers).
FP16_TOLERANCE = 2e-2
#: held-out training images (not used for calibration) on which INT8 and PyTorch FP32 predictions are compared.
AGREEMENT_SAMPLES = 256


@dataclass
class ExportResult:
    """What [`export_model`][maxq.deploy.export.export_model] checked and wrote; ``ok`` is false if a check failed (then
    nothing more is written after it)."""

    check: NMCheck
    summary: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    problem: str = ""


def _dense_bytes(state: dict[str, torch.Tensor]) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()  # a folded state dict stores its zeros: the dense size


def check_outputs(paths: Iterable[str | Path | None], overwrite: bool) -> None:
    """Refuse output paths that repeat, or that exist unless ``overwrite``: called before anything is written.

    Raises:
        ValueError: naming the path and what to do.
    """
    seen: set[Path] = set()
    for path in paths:
        if not path:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise ValueError(f"{path} is given for two outputs: give each output its own path")
        seen.add(resolved)
        if resolved.is_dir():
            raise ValueError(f"{path} is a folder: give a file path for the output")
        if resolved.exists() and not overwrite:
            raise ValueError(f"{path} already exists: choose another path, or pass --overwrite to replace it")


def export_model(
    model: nn.Module,
    arch: dict[str, Any],
    *,
    source: str = "",
    bn_fold: bool = False,
    folded: str | Path | None = None,
    compressed: str | Path | None = None,
    onnx: str | Path | None = None,
    fp16: str | Path | None = None,
    int8: str | Path | None = None,
    calib_samples: int | None = None,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Verify a folded model and write the requested artifacts.

    Args:
        model: folded (mask-free) model carrying its layout (``maxq.nm_layout``).
        arch: how to rebuild it (model name, input channels, classes, image size, dataset); stored in the files.
        bn_fold: fold BatchNorm into the preceding convs first (keeps the pattern).
        source: the run or file the model came from (for messages and the files' metadata).
        folded: path of the folded PyTorch model file (``None``: not written; the same for the other paths).
        compressed: path of the compressed N:M file ([`maxq.save_compressed`][maxq.save_compressed]).
        onnx: path of the FP32 ONNX file, checked against PyTorch with onnxruntime.
        fp16: path of the FP16 ONNX file (FP32 inputs and outputs).
        int8: path of the INT8 (QDQ) ONNX file.
        calib_samples: training images that calibrate the INT8 activations (default
            `DEFAULT_CALIB_SAMPLES`).
        dataset: the dataset of the calibration images (default: the one ``arch`` records).
        data_dir: its folder (default: the dataset's default location).
        overwrite: replace existing output files (otherwise an existing one is an error, before any writing).

    Raises:
        ValueError: an output exists (without ``overwrite``), a compressed file is asked of a model without N:M
            layout (a dense run: its ONNX and folded files are written, unchecked for N:M), no calibration dataset
            is known, or a compressed file does not restore bit-exactly.
    """
    from .quantize import DEFAULT_CALIB_SAMPLES

    check_outputs((folded, compressed, onnx, fp16, int8), overwrite)
    calib_samples = DEFAULT_CALIB_SAMPLES if calib_samples is None else calib_samples
    if int8 and calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {calib_samples}")
    if int8 and not (dataset or arch.get("dataset")):
        raise ValueError(f"{source or 'the model'} does not record its dataset: pass --dataset for INT8 calibration")
    if dataset and not arch.get("dataset"):
        arch = {**arch, "dataset": dataset}  # recorded in the files, for `maxq eval`
    model.eval()
    layout = nm_layout(model)
    if layout is None:
        return _export_dense(model, arch, source, bn_fold, folded, compressed, onnx, fp16, int8, calib_samples,
                             dataset, data_dir)  # fmt: skip
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

        info = save_compressed(
            state, compressed, layout.n, layout.m, layout.layers, arch=arch, transposed=layout.transposed
        )
        restored = load_compressed(compressed)
        exact = restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
        if not exact:
            raise ValueError(f"{compressed} does not restore the weights bit-exactly (please report this)")
        summary["compressed"] = {**info.to_dict(), "path": str(compressed), "bit_exact": exact}
    if onnx or fp16 or int8:
        with tempfile.TemporaryDirectory(prefix="maxq-export-") as tmp:
            _onnx_files(model, arch, layout, result, Path(tmp), onnx, fp16, int8, calib_samples, dataset, data_dir)
    return result


def _export_dense(
    model: nn.Module,
    arch: dict[str, Any],
    source: str,
    bn_fold: bool,
    folded: str | Path | None,
    compressed: str | Path | None,
    onnx: str | Path | None,
    fp16: str | Path | None,
    int8: str | Path | None,
    calib_samples: int,
    dataset: str | None,
    data_dir: str | Path | None,
) -> ExportResult:
    """A model without N:M layers (a dense run, e.g. the baseline to compare against): the folded file and the
    ONNX files (each checked against PyTorch), no N:M check; a compressed N:M file is refused."""
    what = source or "the model"
    if arch.get("method") not in (None, "dense"):
        raise ValueError(f"{what} holds no N:M layout although it records method {arch['method']!r}")
    if compressed:
        raise ValueError(
            f"{what} is a dense run: it has no N:M layers, so there is no compressed N:M file to write; drop "
            f"--compressed (--onnx, --fp16, --int8 and --folded work for a dense run)"
        )
    arch = {**arch, "method": "dense"}
    summary: dict[str, Any] = {"source": source, "dense": True, "n": None, "m": None, "layers": [], "nm_ok": None}
    if bn_fold:
        pairs = fold_batchnorm_(model)
        arch = {**arch, "bn_folded": True}
        summary["bn_folded"] = [f"{conv} <- {bn}" for conv, bn in pairs]
    result = ExportResult(NMCheck(0, 0, [], "a dense run"), summary)
    state = model.state_dict()
    summary["dense_file_bytes"] = _dense_bytes(state)
    if folded:
        atomic_save(folded_file(state, None, arch, {"method": "dense"}), folded)
        summary["folded"] = {"path": str(folded)}
    if onnx or fp16 or int8:
        with tempfile.TemporaryDirectory(prefix="maxq-export-") as tmp:
            _onnx_files(model, arch, None, result, Path(tmp), onnx, fp16, int8, calib_samples, dataset, data_dir)
    return result


def _onnx_check(model: nn.Module, path: Path, example: torch.Tensor) -> tuple[dict[int, float], bool, int]:
    """Parity with PyTorch per batch size, ``maxq verify`` verdict, number of N:M initializers."""
    from .onnx_export import onnx_parity
    from .verify import DENSE_NOTE, verify_file

    check, _, note = verify_file(path)
    if note == DENSE_NOTE:  # a dense model: nothing to be N:M
        return onnx_parity(model, path, example), True, 0
    return onnx_parity(model, path, example), check.ok, len(check.expected)


def _onnx_files(
    model: nn.Module,
    arch: dict[str, Any],
    layout: Any,
    result: ExportResult,
    tmp: Path,
    onnx: str | Path | None,
    fp16: str | Path | None,
    int8: str | Path | None,
    calib_samples: int,
    dataset: str | None,
    data_dir: str | Path | None,
) -> None:
    """FP32 ONNX (to ``onnx``, and as the start of FP16 / INT8), then FP16 and INT8. Each file is built in
    ``tmp``, checked, and copied to its path only if it passes; the first failure stops the rest."""
    from .onnx_export import export_onnx, to_fp16

    summary = result.summary
    example = torch.randn(1, arch["in_channels"], arch["image_size"], arch["image_size"])
    fp32_path = tmp / "fp32.onnx"
    n, m = (layout.n, layout.m) if layout is not None else (None, None)
    export_onnx(model, fp32_path, example, n=n, m=m, arch=arch)
    diffs, nm_ok, count = _onnx_check(model, fp32_path, example)
    if onnx:
        summary["onnx"] = {"path": str(onnx), "max_abs_diff": diffs, "sparse_initializers": count, "nm_ok": nm_ok}
    if max(diffs.values()) > ONNX_TOLERANCE or not nm_ok:
        result.ok, result.problem = False, "the ONNX export does not match PyTorch or is not N:M; no ONNX written"
        return
    if onnx:
        shutil.copyfile(fp32_path, onnx)
    if fp16:
        half = tmp / "fp16.onnx"
        to_fp16(fp32_path, half)
        diffs, nm_ok, count = _onnx_check(model, half, example)
        summary["fp16"] = {"path": str(fp16), "max_abs_diff": diffs, "sparse_initializers": count, "nm_ok": nm_ok}
        if max(diffs.values()) > FP16_TOLERANCE or not nm_ok:
            result.ok, result.problem = False, "the FP16 ONNX file does not match PyTorch or is not N:M; not written"
            return
        shutil.copyfile(half, fp16)
    if int8:
        from .quantize import calibration_images, quantize_int8
        from .verify import DENSE_NOTE, verify_file

        name = dataset or arch["dataset"]
        size = arch.get("image_size") or 224
        images = calibration_images(name, data_dir, calib_samples + AGREEMENT_SAMPLES, image_size=size)
        calib, held = images[:calib_samples], images[calib_samples:]
        q_path = tmp / "int8.onnx"
        info = quantize_int8(fp32_path, q_path, calib)
        check, _, note = verify_file(q_path)
        nm_ok = True if note == DENSE_NOTE else check.ok
        entry: dict[str, Any] = {
            "path": str(int8),
            "calibration": {"dataset": name, "split": "train", "samples": len(calib)},
            **info.to_dict(),
            "nm_ok": nm_ok,
        }
        if len(held):
            entry.update(top1_agreement_with_fp32=_agreement(model, q_path, held), agreement_samples=len(held))
        summary["int8"] = entry
        if not nm_ok:
            result.ok, result.problem = False, "the INT8 ONNX file is not N:M; not written"
            return
        shutil.copyfile(q_path, int8)


def _agreement(model: nn.Module, path: Path, images: torch.Tensor) -> float:
    """Share of ``images`` on which the ONNX file and the PyTorch model predict the same class."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(images).argmax(1).numpy()
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0].argmax(1)
    return float((got == want).mean())
