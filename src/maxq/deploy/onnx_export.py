"""ONNX export of a folded model (FP32, FP16), its check against PyTorch, and reading N:M weights back out of
ONNX files (FP32, FP16 and INT8 QDQ; INT8 export itself is `maxq.deploy.quantize`).

Needs the optional ``onnx`` and ``onnxruntime`` packages (``pip install maxq[onnx]``; ``make`` installs them).
Export uses PyTorch's TorchScript-based exporter, which needs no further packages; constant folding merges
eval-mode BatchNorm into the convolutions, which scales whole filters and keeps the N:M pattern.

Metadata (``metadata_props``): ``maxq.layout`` -- the `NMLayout` record plus the
``sparse_initializers`` that hold the N:M layers; ``maxq.arch`` -- what `maxq.deploy.evaluate` needs (model,
input channels, classes, image size, dataset, method, ``precision``: fp32 / fp16 / int8).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "export_onnx",
    "first_line",
    "onnx_parity",
    "onnx_weights",
    "onnx_metadata",
    "set_onnx_metadata",
    "load_onnx",
    "to_fp16",
    "weight_nodes",
    "ONNX_LAYOUT_KEY",
    "ONNX_ARCH_KEY",
    "ONNX_LAYERS_KEY",
    "layer_names",
]

#: ``metadata_props`` key holding ``{"n", "m", "sparse_initializers": [...]}``.
ONNX_LAYOUT_KEY = "maxq.layout"
#: ``metadata_props`` key holding the architecture record and the file's ``precision``.
ONNX_ARCH_KEY = "maxq.arch"
#: ``metadata_props`` key holding ``{weight initializer name: model layer name}`` (files of maxq >= 0.2.1), so that
#: ``maxq verify`` names ``onnx::Conv_90`` as the layer it came from.
ONNX_LAYERS_KEY = "maxq.layers"


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX support needs the onnx package: pip install 'maxq[onnx]'") from None
    return onnx


def first_line(exc: BaseException) -> str:
    """The first line of an onnx / onnxruntime error (their messages span many lines), or the error's type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_onnx(path: str | Path) -> Any:
    """``onnx.load`` with a one-line ``CheckpointError`` naming the file when it is not a readable ONNX model."""
    from ..train.checkpoint import CheckpointError

    onnx = _require_onnx()
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, truncated files, ...
        raise CheckpointError(f"{path} cannot be read as ONNX (corrupt or truncated?): {first_line(exc)}") from None
    if not proto.graph.node:
        raise CheckpointError(f"{path} cannot be read as ONNX: it holds no graph")
    return proto


def onnx_metadata(model_proto: Any) -> dict[str, Any]:
    """The maxq records in a model's ``metadata_props``: ``{"layout": ... or None, "arch": ... or None}``."""
    props = {p.key: p.value for p in model_proto.metadata_props}
    return {
        "layout": json.loads(props[ONNX_LAYOUT_KEY]) if ONNX_LAYOUT_KEY in props else None,
        "arch": json.loads(props[ONNX_ARCH_KEY]) if ONNX_ARCH_KEY in props else None,
        "layers": json.loads(props[ONNX_LAYERS_KEY]) if ONNX_LAYERS_KEY in props else {},
    }


def set_onnx_metadata(model_proto: Any, key: str, value: dict[str, Any]) -> None:
    """Set (replace) one JSON entry of ``metadata_props``."""
    for i, entry in enumerate(model_proto.metadata_props):
        if entry.key == key:
            del model_proto.metadata_props[i]
            break
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)


def _dequantized_source(node: Any, inits: dict[str, Any]) -> tuple[str, np.ndarray] | None:
    """``(int8 initializer name, q - zero_point)`` behind a ``DequantizeLinear`` node of a constant weight."""
    from onnx import numpy_helper

    if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
        return None
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
    zero = 0
    if len(node.input) > 2 and node.input[2] in inits:
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64)
        if zero.ndim == 1 and q.ndim > 1:  # per-channel along `axis` (default 1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
            zero = zero.reshape([-1 if d == axis else 1 for d in range(q.ndim)])
    return node.input[0], (q - zero).astype(np.float32)


def _weight_inputs(model_proto: Any) -> list[tuple[Any, str, np.ndarray]]:
    """``(node, weight name, [O, I(, kh, kw)] array)`` of every Conv (group 1) / Gemm / constant MatMul, in graph
    order (see `onnx_weights`)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model_proto.graph.initializer}
    producers = {out: node for node in model_proto.graph.node for out in node.output}
    found = []
    for node in model_proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group") is not None and attrs["group"].i != 1:
            continue
        name = node.input[1]
        if name in inits:
            w = numpy_helper.to_array(inits[name])
            if w.dtype.kind != "f":
                continue
        else:
            source = _dequantized_source(producers[name], inits) if name in producers else None
            if source is None:
                continue
            name, w = source
        if node.op_type == "Gemm" and (attrs.get("transB") is None or attrs["transB"].i == 0):
            w = w.T
        elif node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            w = w.T
        found.append((node, name, w))
    return found


def onnx_weights(model_proto: Any) -> dict[str, tuple[Tensor, str]]:
    """N:M candidate weights of an ONNX graph as ``{initializer name: ([O, I(, kh, kw)] tensor, op)}``, in graph
    order: ``Conv`` (group 1) weights as they are, ``Gemm`` B (transposed when ``transB=0``) and constant
    ``MatMul`` B (stored ``[I, O]``, transposed).

    Float initializers (FP32, FP16) come as they are; a quantized weight (an integer initializer behind a
    ``DequantizeLinear``, INT8 QDQ) comes under the integer initializer's name as its levels ``q - zero_point``
    (as float): zero exactly where the dequantized weight is."""
    return {
        name: (torch.from_numpy(np.array(w, copy=True, order="C")), node.op_type)
        for node, name, w in _weight_inputs(model_proto)
    }


def weight_nodes(model_proto: Any) -> dict[str, str]:
    """``{Conv/Gemm/MatMul node name: its weight's name as `onnx_weights` keys it}`` (node names survive
    quantization, initializer names do not)."""
    return {node.name: name for node, name, _ in _weight_inputs(model_proto)}


def _scope_module(node_name: str) -> str:
    """The module path in a TorchScript-exporter node name: ``/layers/layers.0/layers.0.0/conv1/Conv`` ->
    ``layers.0.0.conv1`` (each scope is either the full path so far or one attribute name)."""
    name = ""
    for part in node_name.strip("/").split("/")[:-1]:
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    return name


def layer_names(model: nn.Module, model_proto: Any) -> dict[str, str]:
    """``{weight initializer: model layer name}`` for the Conv/Gemm/MatMul weights of an export of ``model`` whose
    node scope names a Conv2d/Linear layer of the model with a weight of the same shape."""
    modules = dict(model.named_modules())
    names = {}
    for node, init, w in _weight_inputs(model_proto):
        layer = _scope_module(node.name)
        module = modules.get(layer)
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and weight is not None and tuple(weight.shape) == w.shape:
            names[init] = layer
    return names


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    n: int | None = None,
    m: int | None = None,
    opset: int = 17,
    arch: dict[str, Any] | None = None,
) -> list[str]:
    """Export ``model`` (eval mode, dynamic batch) to ``path``; returns the initializers that hold N:M layers.

    With ``n, m`` given, the initializers whose zero pattern is that of a sparsified layer of ``model`` are
    recorded in the file's metadata (``maxq.layout``) for ``maxq verify``; ``arch`` is recorded as ``maxq.arch``
    (with ``precision: fp32``) for ``maxq eval``; the model's layer names as ``maxq.layers``.
    """
    onnx = _require_onnx()
    from ..core.fold import nm_layout
    from ..core.layers import input_axis
    from ..core.nm import oi_view

    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    sparse: list[str] = []
    layout = nm_layout(model)
    if n is not None and m is not None and layout is not None:
        modules = dict(model.named_modules())
        # onnx_weights gives [O, I(, kh, kw)]: compare with the same view of each layer (HF Conv1D stores [I, O])
        patterns = [oi_view(modules[name].weight.detach(), input_axis(modules[name])) != 0 for name in layout.layers]
        for name, (w, _) in onnx_weights(proto).items():
            nz = w != 0
            if any(p.shape == nz.shape and torch.equal(p, nz) for p in patterns):
                sparse.append(name)
        set_onnx_metadata(proto, ONNX_LAYOUT_KEY, {**layout.to_dict(), "n": n, "m": m, "sparse_initializers": sparse})
    if arch is not None:
        set_onnx_metadata(proto, ONNX_ARCH_KEY, {**arch, "precision": "fp32"})
    names = layer_names(model, proto)
    if names:
        set_onnx_metadata(proto, ONNX_LAYERS_KEY, names)
    if proto.metadata_props:
        onnx.save(proto, str(path))
    return sparse


def to_fp16(src: str | Path, dst: str | Path) -> None:
    """FP32 ONNX file -> FP16 weights and compute, FP32 inputs and outputs (casts at the edges, as TensorRT and
    onnxruntime users expect); initializer names, and so the N:M records, are kept."""
    onnx = _require_onnx()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    meta = onnx_metadata(proto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model has values out of fp16 range": clipped, as documented
        half = convert_float_to_float16(proto, keep_io_types=True)
    if meta["arch"] is not None:
        set_onnx_metadata(half, ONNX_ARCH_KEY, {**meta["arch"], "precision": "fp16"})
    onnx.save(half, str(dst))


def onnx_parity(
    model: nn.Module, path: str | Path, example: Tensor, batch_sizes: Sequence[int] = (1, 2, 7, 16)
) -> dict[int, float]:
    """Max absolute difference between onnxruntime and PyTorch outputs, per batch size (fp32 inputs), in units of
    the output scale ``max(1, max |torch output|)``: fp32 agreement is 1e-4 for logits of order one, and relative
    for larger ones; fp16 files agree to about 1e-3."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("ONNX checks need onnxruntime: pip install 'maxq[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval()
    diffs = {}
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = torch.randn((b, *example.shape[1:]), generator=gen)
        with torch.no_grad():
            want = model(x).float().numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        diffs[b] = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
    return diffs
