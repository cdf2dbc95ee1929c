"""CUDA only: 2:4 acceleration with torch's semi-structured sparse kernels, per layer and end to end.

For a Linear-heavy model (ViT-B/16: its MLP and attention-output Linears) and ResNet-50 (1x1 convs lowered to
Linear): hard 2:4 masks from the weights, fold, fp16, then ``maxq.accelerate_`` (which times each layer dense vs
sparse at its real input shape and keeps dense where sparse is not faster). Prints and writes JSON: the
per-layer table, end-to-end latency dense vs accelerated (same model, side by side), and output agreement.

    python benchmarks/accelerate.py --out results/accelerate.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torchvision

import maxq
from maxq.deploy.accelerate import accelerate_, time_cuda

MODELS = {
    "vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=1000), (64, 3, 224, 224)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=1000), (64, 3, 224, 224)),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-size", type=int, help="override the batch size")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--out", type=Path, default=Path("results/accelerate.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/accelerate.py needs a CUDA GPU (2:4 sparse tensor cores); nothing measured.", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    result = {
        "benchmark": "accelerate",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "models": {},
    }
    for name in args.models:
        build, shape = MODELS[name]
        if args.batch_size:
            shape = (args.batch_size, *shape[1:])
        model = build()
        maxq.sparsify_(model, maxq.SRSTEConfig(n=2, m=4, skip_first=True, skip_last=False))
        maxq.fold_(model)
        model = model.cuda().to(dtype).eval()
        dense = copy.deepcopy(model)
        x = torch.randn(shape, device="cuda", dtype=dtype)
        report = accelerate_(model, x, dtype=dtype)
        with torch.no_grad():
            want, got = dense(x).float(), model(x).float()
            dense_ms = time_cuda(lambda: dense(x), 3, 20)  # noqa: B023
            sparse_ms = time_cuda(lambda: model(x), 3, 20)  # noqa: B023
        cos = torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0).item()
        entry = {
            "input": list(shape),
            "layers": report.to_dict(),
            "end_to_end_ms": {"dense": dense_ms, "accelerated": sparse_ms, "speedup": dense_ms / sparse_ms},
            "output_max_abs_diff": (want - got).abs().max().item(),
            "output_cosine": cos,
            "top1_agreement": (want.argmax(1) == got.argmax(1)).float().mean().item(),
        }
        result["models"][name] = entry
        print(f"\n== {name}, input {'x'.join(map(str, shape))}, {args.dtype}, {result['device']}")
        print(report)
        print(f"end to end: dense {dense_ms:.2f} ms, accelerated {sparse_ms:.2f} ms, x{dense_ms / sparse_ms:.3f}; "
              f"{len(report.swapped)}/{len(report.rows)} layers sparse; output cosine {cos:.5f}, top-1 agreement "
              f"{entry['top1_agreement']:.3f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
