"""``maxq eval``: test-set top-1 / top-5 / loss of any artifact maxq writes, so the exported file itself is checked.

Kinds: a run folder (its ``model_folded.pt``), ``checkpoint.pt`` (folded here), ``model_folded.pt``, a compressed
file (PyTorch, CPU), and FP32 / FP16 / INT8 ONNX files (onnxruntime, CPU). Images are normalized exactly as in
training (`maxq.train.data.normalize`); the dataset defaults to the one the file records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..train.checkpoint import CheckpointError
from .artifacts import file_kind, model_from

__all__ = ["EvalResult", "evaluate_file"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Test-split metrics of one file: ``top1`` / ``top5`` in percent, ``loss`` mean cross-entropy (nats)."""

    file: str
    kind: str
    precision: str  # fp32 for PyTorch files; what an ONNX file records (fp32 / fp16 / int8)
    dataset: str
    samples: int
    top1: float
    top5: float
    loss: float
    seconds: float  # wall time of the evaluation (forward passes and data), not of loading the file
    note: str = ""  # e.g. what was evaluated of a checkpoint stopped mid-ramp

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _onnx_predictor(path: Path, threads: int | None) -> tuple[Callable[[Tensor], Tensor], dict[str, Any], str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("evaluating ONNX files needs onnxruntime: pip install 'maxq[onnx]'") from None
    from .onnx_export import first_line, load_onnx, onnx_metadata

    arch = onnx_metadata(load_onnx(path))["arch"] or {}
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (invalid graph, unsupported op, ...)
        raise CheckpointError(f"{path}: onnxruntime cannot run it: {first_line(exc)}") from None
    feed = session.get_inputs()[0]
    dtype = np.float16 if feed.type == "tensor(float16)" else np.float32

    def predict(x: Tensor) -> Tensor:
        try:
            out = session.run(None, {feed.name: x.numpy().astype(dtype)})[0]
        except Exception as exc:  # e.g. images of another size or channel count than the graph takes
            why, shape = first_line(exc), tuple(x.shape)
            raise ValueError(f"{path}: onnxruntime failed on {shape} images ({why}); wrong --dataset?") from None
        return torch.from_numpy(np.asarray(out)).float()

    return predict, arch, arch.get("precision", "fp32")


def _torch_predictor(path: Path) -> tuple[Callable[[Tensor], Tensor], dict[str, Any], str]:
    model, arch = model_from(path, as_trained=True)  # a run stopped mid-ramp: evaluated as trained so far
    model.eval()

    def predict(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x).float()

    return predict, arch, "fp32"


def evaluate_file(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    *,
    batch_size: int = 256,
    threads: int | None = None,
) -> EvalResult:
    """Evaluate ``path`` on ``dataset``'s test split (default: the dataset the file records).

    Raises:
        ValueError: no dataset known, or one whose images or classes do not fit the model.
        CheckpointError / CompressedError: the file is unreadable or corrupt.
        DatasetMissing: the dataset's files are not there.
    """
    from ..train.data import load_dataset, normalize
    from ..train.metrics import batch_counts, from_counts

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    path = Path(path)
    kind = file_kind(path)
    predict, arch, precision = _onnx_predictor(path, threads) if kind == "onnx" else _torch_predictor(path)
    recorded = arch.get("dataset")
    dataset = dataset or recorded
    if not dataset:
        raise ValueError(f"{path} does not record its dataset: pass --dataset (and --data-dir if needed)")
    if recorded and dataset != recorded:
        log.warning("%s was trained on %s; evaluating it on %s as asked", path, recorded, dataset)
    splits = load_dataset(dataset, data_dir, image_size=arch.get("image_size") or 224)
    info = splits.info
    for key, have in (("in_channels", info.channels), ("num_classes", info.classes)):
        if arch.get(key) is not None and arch[key] != have:
            raise ValueError(f"{path} expects {key}={arch[key]}, but {dataset} has {have}: pick the right --dataset")
    loader = torch.utils.data.DataLoader(splits.test, batch_size=batch_size, shuffle=False)
    started = time.perf_counter()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-5, count
    for x, y in loader:
        x = normalize(x, info) if info.in_memory else x.float()
        totals += batch_counts(predict(x), y)
    seconds = time.perf_counter() - started
    metrics = from_counts(totals)
    note = ""
    if arch.get("unfinished_ramp"):
        note = (
            f"unfinished ramp ({arch['unfinished_ramp']:.0%} of blocks still dense): evaluated as trained so far, "
            f"with its current masks (as the last epoch's test top-1); not N:M yet. Finish it with maxq train --out "
            f"RUN --resume, or prune it now with maxq export --force"
        )
        log.warning("%s: %s", path, note)
    return EvalResult(
        str(path), kind, precision, dataset, int(totals[3]), metrics["top1"], metrics["top5"], metrics["loss"], seconds,
        note,
    )  # fmt: skip
