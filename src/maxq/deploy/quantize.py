"""INT8 ONNX: static post-training quantization of an FP32 export with onnxruntime's quantizer.

* Format QDQ (``QuantizeLinear`` / ``DequantizeLinear`` pairs around FP32 ops), which onnxruntime fuses into
  integer kernels on CPU and TensorRT reads as explicit quantization.
* Weights: int8, per output channel, **symmetric** (zero point 0), so a pruned weight is exactly 0 in the int8
  initializer and the N:M pattern survives (checked here, and by ``maxq verify`` on the int8 initializers).
* Activations: uint8, per tensor, asymmetric, MinMax-calibrated. On x86 onnxruntime's int8 kernels multiply
  unsigned activations by signed weights (AVX2 / AVX-512 VNNI ``u8 x s8`` dot products), so U8S8 is its native
  path: ResNet-18 (2:4, batch 8 x 224 x 224, 2 threads, onnxruntime 1.32, Xeon with AVX-512 VNNI) ran in 128 ms
  with uint8 activations and 371 ms with int8 ones (cnn_small: 70 vs 75 ms). Activations after ReLU are
  non-negative, which uint8 covers without wasting a sign bit. (CPUs without VNNI can saturate in ``u8 x s8``;
  onnxruntime's ``reduce_range`` is the remedy there, not needed on this machine.)
* Calibration: training images only (never test images), a seeded random sample, normalized exactly as training
  does (`maxq.train.data.normalize`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .onnx_export import (
    ONNX_ARCH_KEY,
    ONNX_LAYERS_KEY,
    ONNX_LAYOUT_KEY,
    _require_onnx,
    onnx_metadata,
    onnx_weights,
    set_onnx_metadata,
    weight_nodes,
)

__all__ = ["DEFAULT_CALIB_SAMPLES", "QuantizeInfo", "calibration_images", "quantize_int8"]

log = logging.getLogger(__name__)

#: training images used to calibrate activation ranges by default.
DEFAULT_CALIB_SAMPLES = 512
#: the scheme, as recorded in the file's ``maxq.arch`` metadata.
SCHEME = {
    "format": "QDQ",
    "weights": "int8, per output channel, symmetric",
    "activations": "uint8, per tensor, asymmetric (MinMax)",
}


@dataclass
class QuantizeInfo:
    """What [`quantize_int8`][maxq.deploy.quantize.quantize_int8] checked: the sparse int8 initializers, and the weights
    quantization zeroed.

    ``pruned_nonzero`` (pruned FP32 weights that are not 0 in int8) must be 0; ``kept_rounded_to_zero`` counts kept
    weights smaller than half a quantization step (a block then holds fewer than N nonzeros: still N:M)."""

    sparse_initializers: list[str]
    pruned_nonzero: int
    kept_rounded_to_zero: int
    kept_total: int
    calib_samples: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def calibration_images(
    dataset: str, data_dir: str | Path | None, samples: int, *, image_size: int = 224, seed: int = 0
) -> Tensor:
    """``samples`` images of ``dataset``'s **training** split (a seeded random choice), as the model sees them:
    ``[samples, C, H, W]`` float32, normalized as in training (sets decoded on the fly come through their own
    training transform)."""
    from ..train.data import load_dataset, normalize

    if samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {samples}")
    splits = load_dataset(dataset, data_dir, image_size=image_size)
    train = splits.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples]
    if isinstance(train, torch.utils.data.TensorDataset):
        images = train.tensors[0][order]
    else:
        images = torch.stack([train[int(i)][0] for i in order])
    if len(order) < samples:
        log.warning("the %s training set has %d images; calibrating on all of them", dataset, len(order))
    return normalize(images, splits.info) if splits.info.in_memory else images.float()


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over a float tensor, in batches."""

    def __init__(self, images: Tensor, input_name: str, batch_size: int) -> None:
        self._batches = iter(images[i : i + batch_size].numpy() for i in range(0, len(images), batch_size))
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def quantize_int8(src: str | Path, dst: str | Path, images: Tensor, *, batch_size: int = 64) -> QuantizeInfo:
    """Quantize the FP32 ONNX file ``src`` (as
    [`maxq.deploy.onnx_export.export_onnx`][maxq.deploy.onnx_export.export_onnx] writes it) to ``dst``.

    The N:M records follow the weights: ``maxq.layout`` names the int8 initializers of the sparse layers, and
    ``maxq.arch`` gains ``precision: int8`` and the scheme.

    Raises:
        ValueError: a pruned weight is not 0 after quantization, or a sparse layer cannot be found again.
    """
    onnx = _require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = onnx.load(str(src))
    meta = onnx_metadata(fp32)
    input_name = fp32.graph.input[0].name
    printed = io.StringIO()  # onnxruntime's quantizer prints progress: keep it out of the caller's stdout
    with tempfile.TemporaryDirectory(prefix="maxq-int8-") as tmp, contextlib.redirect_stdout(printed):
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre))  # shape inference + graph clean-up, as onnxruntime recommends
        quantize_static(
            str(pre),
            str(out),
            _Reader(images.float().contiguous(), input_name, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        int8 = onnx.load(str(out))
    if printed.getvalue().strip():
        log.debug("onnxruntime quantizer: %s", printed.getvalue().strip())

    fp_weights, q_weights = onnx_weights(fp32), onnx_weights(int8)
    fp_by_node, q_by_node = weight_nodes(fp32), weight_nodes(int8)
    pruned_nonzero = kept_zero = kept = 0
    for node, fp_name in fp_by_node.items():
        q_name = q_by_node.get(node)
        if q_name is None or q_name not in q_weights:
            continue  # a weight left in float (not quantized)
        w, q = fp_weights[fp_name][0], q_weights[q_name][0]
        pruned_nonzero += int(((w == 0) & (q != 0)).sum())
        kept_zero += int(((w != 0) & (q == 0)).sum())
        kept += int((w != 0).sum())
    if pruned_nonzero:
        raise ValueError(f"{pruned_nonzero} pruned weights are not 0 after int8 quantization (please report this)")
    sparse: list[str] = []
    layout = meta["layout"]
    if layout is not None:
        wanted = set(layout["sparse_initializers"])
        nodes = [node for node, name in fp_by_node.items() if name in wanted]
        sparse = [q_by_node[node] for node in nodes if node in q_by_node and q_by_node[node] in q_weights]
        if len(sparse) != len(wanted):
            raise ValueError(
                f"found {len(sparse)} of the {len(wanted)} N:M layers of {src} as int8 weights after quantization"
            )
        set_onnx_metadata(int8, ONNX_LAYOUT_KEY, {**layout, "sparse_initializers": sparse})
    if meta["layers"]:  # the layer names follow the weights to their int8 initializers, by node
        names = {q_by_node[node]: meta["layers"][name] for node, name in fp_by_node.items()
                 if name in meta["layers"] and node in q_by_node}  # fmt: skip
        set_onnx_metadata(int8, ONNX_LAYERS_KEY, names)
    info = QuantizeInfo(sparse, pruned_nonzero, kept_zero, kept, len(images))
    arch = meta["arch"] or {}
    scheme = {**SCHEME, "calib_samples": len(images)}
    set_onnx_metadata(int8, ONNX_ARCH_KEY, {**arch, "precision": "int8", "quantization": scheme})
    onnx.save(int8, str(dst))
    return info
