"""2:4 acceleration on CUDA with ``torch.sparse.to_sparse_semi_structured`` (METHOD.md §6), measured per layer.

2:4 is the only pattern with hardware support (sparse tensor cores, compute capability >= 8.0). Eligible:
``nn.Linear`` layers, and 1x1 ``nn.Conv2d`` layers (stride 1, no padding, groups 1) lowered to a Linear over the
channels, whose weights are exactly 2:4 and whose shapes fit the kernels. Each is timed dense vs sparse at the
input shape it actually sees in ``example``; only layers where sparse is faster by ``min_speedup`` are swapped.
Real speedups are shape-dependent (often none for small matrices), hence the measurement. No CPU runtime
accelerates 50 % N:M: on CPU the gain is storage (`maxq.compress`), and [`accelerate_`][maxq.accelerate_] refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.nm import to_blocks

__all__ = ["AccelRow", "AccelReport", "Conv1x1AsLinear", "accelerate_", "candidates", "time_cuda"]


class Conv1x1AsLinear(nn.Module):
    """A 1x1 convolution (stride 1, no padding, groups 1) computed as ``F.linear`` over the channel axis."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels).clone())
            if conv.bias is not None:
                self.linear.bias = nn.Parameter(conv.bias.detach().clone())
        self.linear.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.permute(0, 2, 3, 1).contiguous())  # [B, H, W, C_in] -> [B, H, W, C_out]
        return y.permute(0, 3, 1, 2)


def _is_1x1(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.groups == 1
        and conv.dilation == (1, 1)
    )


@dataclass
class AccelRow:
    name: str
    kind: str  # "linear" or "conv1x1"
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    dense_ms: float | None = None
    sparse_ms: float | None = None
    swapped: bool = False
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.sparse_ms if self.dense_ms and self.sparse_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "speedup": self.speedup, "weight_shape": list(self.weight_shape)}


@dataclass
class AccelReport:
    rows: list[AccelRow] = field(default_factory=list)

    @property
    def swapped(self) -> list[AccelRow]:
        return [r for r in self.rows if r.swapped]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "swapped": len(self.swapped)}

    def __str__(self) -> str:
        head = ("layer", "kind", "weight", "input", "dense ms", "sparse ms", "x")
        cols = f"{head[0]:40s} {head[1]:8s} {head[2]:>12s} {head[3]:>18s} {head[4]:>9s} {head[5]:>9s} {head[6]:>6s}"
        lines = [cols + "  decision"]
        for r in self.rows:
            sp = f"{r.speedup:.2f}" if r.speedup else "-"
            dm = f"{r.dense_ms:.4f}" if r.dense_ms else "-"
            sm = f"{r.sparse_ms:.4f}" if r.sparse_ms else "-"
            shape = "x".join(map(str, r.weight_shape))
            inp = "x".join(map(str, r.input_shape)) if r.input_shape else "-"
            decision = "sparse" if r.swapped else "dense: " + r.reason
            lines.append(
                f"{r.name[:40]:40s} {r.kind:8s} {shape:>12s} {inp:>18s} {dm:>9s} {sm:>9s} {sp:>6s}  {decision}"
            )
        return "\n".join(lines)


def candidates(model: nn.Module, example: Tensor) -> list[AccelRow]:
    """Layers that could run 2:4 sparse, with the input shape each sees when ``model(example)`` runs (any device)."""
    rows: dict[str, AccelRow] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.Conv2d) and _is_1x1(module):
            kind = "conv1x1"
        else:
            continue
        rows[name] = AccelRow(name, kind, tuple(module.weight.shape), None)

        def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            x = args[0]
            shape = (
                tuple(x.shape) if rows[name].kind == "linear" else (x.shape[0] * x.shape[2] * x.shape[3], x.shape[1])
            )
            rows[name].input_shape = (int(torch.tensor(shape[:-1]).prod()), shape[-1])  # as a 2-D matmul

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for row in rows.values():
        if row.input_shape is None:
            row.reason = "not called in the example forward"
    return list(rows.values())


def _is_24(weight: Tensor) -> bool:
    w = weight.reshape(weight.shape[0], -1)
    return w.shape[1] % 4 == 0 and bool(((to_blocks(w, 4) != 0).sum(-1) <= 2).all())


def time_cuda(fn: Callable[[], Any], warmup: int = 5, iters: int = 50) -> float:
    """Median milliseconds of ``fn`` over ``iters`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def accelerate_(
    model: nn.Module,
    example: Tensor,
    *,
    dtype: torch.dtype = torch.float16,
    min_speedup: float = 1.0,
    warmup: int = 5,
    iters: int = 50,
) -> AccelReport:
    """Swap eligible 2:4 layers of a folded model to semi-structured sparse weights where that is faster.

    Args:
        model: folded (mask-free) model, on a CUDA device; it is cast to ``dtype`` in place.
        example: an input batch of the shape you will serve (timings depend on it).
        dtype: ``torch.float16`` or ``torch.bfloat16`` (what the sparse kernels take).
        min_speedup: swap a layer only if dense time / sparse time exceeds this.

    Returns:
        the per-layer table (timings, decisions and reasons).

    Raises:
        RuntimeError: no CUDA, or the model is not on a CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "maxq.accelerate_ needs a CUDA GPU with 2:4 sparse tensor cores (compute capability >= 8.0). No CPU "
            "runtime accelerates 50% N:M; on CPU the gain is storage (maxq export --compressed)."
        )
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"move the model to CUDA first (it is on {device})")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    if torch.cuda.get_device_capability(device)[0] < 8:
        raise RuntimeError("2:4 sparse kernels need compute capability >= 8.0 (Ampere or newer)")
    from torch.sparse import to_sparse_semi_structured

    model.to(dtype).eval()
    example = example.to(device, dtype)
    report = AccelReport(candidates(model, example))
    modules = dict(model.named_modules())
    for row in report.rows:
        if row.input_shape is None:
            continue
        module = modules[row.name]
        weight = module.weight.detach().reshape(module.weight.shape[0], -1).contiguous()
        if not _is_24(weight):
            row.reason = "weight is not 2:4"
            continue
        bias = module.bias.detach() if module.bias is not None else None
        x = torch.randn(row.input_shape, device=device, dtype=dtype)
        try:
            sparse_weight = to_sparse_semi_structured(weight)
            sparse_out = torch.nn.functional.linear(x, sparse_weight, bias)
        except (RuntimeError, NotImplementedError) as exc:  # shape or dtype the kernels do not take
            row.reason = f"unsupported: {str(exc).splitlines()[0][:80]}"
            continue
        dense_out = torch.nn.functional.linear(x, weight, bias)
        if not torch.allclose(sparse_out.float(), dense_out.float(), rtol=1e-2, atol=1e-2):
            row.reason = "sparse kernel output differs"
            continue
        row.dense_ms = time_cuda(lambda: torch.nn.functional.linear(x, weight, bias), warmup, iters)  # noqa: B023
        row.sparse_ms = time_cuda(lambda: torch.nn.functional.linear(x, sparse_weight, bias), warmup, iters)  # noqa: B023
        if row.speedup is None or row.speedup <= min_speedup:
            row.reason = f"sparse not faster ({row.speedup:.2f}x)" if row.speedup else "timing failed"
            continue
        if row.kind == "linear":
            module.weight = nn.Parameter(sparse_weight, requires_grad=False)
        else:
            lowered = Conv1x1AsLinear(module)
            lowered.linear.weight = nn.Parameter(sparse_weight, requires_grad=False)
            parent, _, child = row.name.rpartition(".")
            setattr(modules[parent] if parent else model, child, lowered)
        row.swapped = True
    return report
