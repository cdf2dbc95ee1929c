"""ONNX export of a folded model, its check against PyTorch, and reading N:M weights back out of ONNX files.

Needs the optional ``onnx`` and ``onnxruntime`` packages (``pip install maxq[onnx]``; ``make`` installs them).
Export uses PyTorch's TorchScript-based exporter, which needs no further packages; constant folding merges
eval-mode BatchNorm into the convolutions, which scales whole filters and keeps the N:M pattern.
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

__all__ = ["export_onnx", "onnx_parity", "onnx_weights", "ONNX_LAYOUT_KEY"]

#: ``metadata_props`` key holding ``{"n", "m", "sparse_initializers": [...]}``.
ONNX_LAYOUT_KEY = "maxq.layout"


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX support needs the onnx package: pip install 'maxq[onnx]'") from None
    return onnx


def onnx_weights(model_proto: Any) -> dict[str, tuple[Tensor, str]]:
    """N:M candidate weights of an ONNX graph as ``{initializer name: ([O, I(, kh, kw)] tensor, op)}``, in graph
    order: ``Conv`` (group 1) weights as they are, ``Gemm`` B (transposed when ``transB=0``) and constant
    ``MatMul`` B (stored ``[I, O]``, transposed)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model_proto.graph.initializer}
    out: dict[str, tuple[Tensor, str]] = {}
    for node in model_proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            if attrs.get("group") is not None and attrs["group"].i != 1:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
        elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB") is None or attrs["transB"].i == 0:
                w = w.T
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim != 2:
                continue
            w = w.T
        else:
            continue
        if w.dtype.kind == "f":
            out[node.input[1]] = (torch.from_numpy(np.array(w, copy=True, order="C")), node.op_type)
    return out


def export_onnx(
    model: nn.Module, path: str | Path, example: Tensor, *, n: int | None = None, m: int | None = None, opset: int = 17
) -> list[str]:
    """Export ``model`` (eval mode, dynamic batch) to ``path``; returns the initializers that hold N:M layers.

    With ``n, m`` given, the initializers whose zero pattern is that of a sparsified layer of ``model`` are
    recorded in the file's metadata (``maxq.layout``) for ``maxq verify``.
    """
    onnx = _require_onnx()
    from ..core.fold import nm_layout

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
        patterns = [(modules[name].weight.detach() != 0) for name in layout.layers]
        for name, (w, _) in onnx_weights(proto).items():
            nz = w != 0
            if any(p.shape == nz.shape and torch.equal(p, nz) for p in patterns):
                sparse.append(name)
        entry = proto.metadata_props.add()
        entry.key = ONNX_LAYOUT_KEY
        record = {**layout.to_dict(), "n": n, "m": m, "sparse_initializers": sparse}
        entry.value = json.dumps(record)
        onnx.save(proto, str(path))
    return sparse


def onnx_parity(
    model: nn.Module, path: str | Path, example: Tensor, batch_sizes: Sequence[int] = (1, 2, 7, 16)
) -> dict[int, float]:
    """Max absolute difference between onnxruntime and PyTorch outputs, per batch size (fp32), in units of the
    output scale ``max(1, max |torch output|)``: fp32 agreement is 1e-4 for logits of order one, and relative for
    larger ones."""
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
