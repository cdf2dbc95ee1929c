"""CUDA only: 2:4 acceleration with torch's semi-structured sparse kernels, per layer and end to end.

For a Linear-heavy model (ViT-B/16: its MLP and attention-output Linears) and ResNet-50 (1x1 convs lowered to
Linear): hard 2:4 masks from the weights, fold, fp16, then ``maxq.accelerate_`` (which times each layer dense vs
sparse at its real input shape and keeps dense where sparse is not faster). Prints and writes JSON: the
per-layer table, end-to-end latency dense vs accelerated (same model, side by side), and output agreement. The
JSON is rewritten after each model; a model that fails is recorded with its error and the next one runs.

    python benchmarks/accelerate.py --out results/accelerate.json
    python benchmarks/accelerate.py --dry-run --models resnet50 --batch-size 2 --image-size 64 --out /tmp/a.json

``--dry-run`` rehearses on the CPU everything but the CUDA kernels: build, 2:4 masks, fold, and the candidate
layers with the input shapes they see (no timings).
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import maxq
from maxq.deploy.accelerate import AccelReport, accelerate_, candidates, time_cuda

#: name -> (builder taking the image size, default input shape)
MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, int, int, int]]] = {
    "vit_b_16": (lambda size: torchvision.models.vit_b_16(num_classes=1000, image_size=size), (64, 3, 224, 224)),
    "resnet50": (lambda size: torchvision.models.resnet50(num_classes=1000), (64, 3, 224, 224)),
}


def _save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def measure(name: str, shape: tuple[int, ...], dtype: torch.dtype, dry_run: bool) -> dict[str, Any]:
    """One model: sparsify 2:4, fold, accelerate (CUDA) or list the candidates (dry run); its JSON entry."""
    build = MODELS[name][0]
    model = build(shape[-1])
    maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4, skip_first=True, skip_last=False))
    maxq.fold_(model)
    if dry_run:
        model.eval()
        x = torch.randn(shape)
        report = AccelReport(candidates(model, x))
        for row in report.rows:
            row.reason = row.reason or "dry run: no CUDA timing"
        with torch.no_grad():
            out = model(x)
        assert torch.isfinite(out).all(), "non-finite outputs"
        print(f"\n== {name}, input {'x'.join(map(str, shape))}, dry run on the CPU")
        print(report)
        return {"input": list(shape), "layers": report.to_dict(), "dry_run": True}
    model = model.cuda().to(dtype).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    report = accelerate_(model, x, dtype=dtype)
    with torch.no_grad():
        want, got = dense(x).float(), model(x).float()
        dense_ms = time_cuda(lambda: dense(x), 3, 20)
        sparse_ms = time_cuda(lambda: model(x), 3, 20)
    cos = torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0).item()
    entry = {
        "input": list(shape),
        "layers": report.to_dict(),
        "end_to_end_ms": {"dense": dense_ms, "accelerated": sparse_ms, "speedup": dense_ms / sparse_ms},
        "output_max_abs_diff": (want - got).abs().max().item(),
        "output_cosine": cos,
        "top1_agreement": (want.argmax(1) == got.argmax(1)).float().mean().item(),
    }
    print(f"\n== {name}, input {'x'.join(map(str, shape))}, {dtype}, {torch.cuda.get_device_name()}")
    print(report)
    print(f"end to end: dense {dense_ms:.2f} ms, accelerated {sparse_ms:.2f} ms, x{dense_ms / sparse_ms:.3f}; "
          f"{len(report.swapped)}/{len(report.rows)} layers sparse; output cosine {cos:.5f}, top-1 agreement "
          f"{entry['top1_agreement']:.3f}")  # fmt: skip
    return entry


def parser() -> argparse.ArgumentParser:
    """The command line (also used by tests/test_gpu_check.py to check gpu_check.sh's flags)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-size", type=int, help="override the batch size")
    ap.add_argument("--image-size", type=int, help="override the image size (224)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal: everything but the CUDA kernels")
    ap.add_argument("--out", type=Path, default=Path("results/accelerate.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGTERM, chain=True)  # a timeout shows where it was
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/accelerate.py needs a CUDA GPU (2:4 sparse tensor cores); nothing measured.", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "benchmark": "accelerate",
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "models": {},
        "errors": {},
    }
    _save(result, args.out)
    for name in args.models:
        shape = MODELS[name][1]
        shape = (args.batch_size or shape[0], shape[1], args.image_size or shape[2], args.image_size or shape[3])
        try:
            result["models"][name] = measure(name, shape, dtype, args.dry_run)
        except Exception as exc:  # e.g. a kernel this torch lacks: record it, measure the next model
            result["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc()
        _save(result, args.out)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"\nwrote {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
