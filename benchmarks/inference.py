"""CPU inference: dense vs folded N:M model latency, side by side; FP32 vs INT8 ONNX latency with onnxruntime, side
by side; and file sizes dense / folded / compressed / ONNX.

The folded model has the same architecture and dense kernels, so ~1.0x latency is the honest expectation: no CPU
runtime accelerates N:M. The gain on CPU is storage, measured here for every pattern asked for. INT8 is what CPU
runtimes do accelerate: the folded 2:4 model is exported to FP32 ONNX and quantized to INT8 (QDQ, as
``maxq export --int8`` does; calibrated on random inputs here, which sets the ranges but not the speed).

    python benchmarks/inference.py --threads 2 --out results/inference.json
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import maxq
from maxq.deploy.compress import save_compressed
from maxq.train.models import build_model

CALIBRATION = {"resnet18": 16, "cnn_small": 256}  # random images for the INT8 ranges (latency only)

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=1000), (8, 3, 224, 224)),
    "cnn_small": (lambda: build_model("cnn_small", 1, 10), (256, 1, 28, 28)),
}


def _bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def folded_copy(model: torch.nn.Module, n: int, m: int) -> torch.nn.Module:
    sparse = copy.deepcopy(model)
    maxq.sparsify_(sparse, maxq.SRSTEConfig(n=n, m=m))  # hard N:M masks from the weights
    return maxq.fold_(sparse).eval()


def latency(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(rounds):
            for name, model in models.items():  # turns: noise hits every variant alike
                start = time.perf_counter()
                for _ in range(reps):
                    model(x)
                times[name].append((time.perf_counter() - start) / reps * 1e3)
    return times


def onnx_latency(
    model: torch.nn.Module, x: torch.Tensor, calib: int, threads: int, rounds: int, reps: int, tmp: Path
) -> dict:
    """FP32 vs INT8 ONNX (onnxruntime, CPU, ``threads`` intra-op threads): median latency in turns, and file sizes."""
    import onnxruntime as ort

    from maxq.deploy.onnx_export import export_onnx
    from maxq.deploy.quantize import quantize_int8

    layout = model.maxq_layout
    files = {"onnx fp32": tmp / "fp32.onnx", "onnx int8": tmp / "int8.onnx"}
    export_onnx(model, files["onnx fp32"], x[:1], n=layout.n, m=layout.m)
    quantize_int8(files["onnx fp32"], files["onnx int8"], torch.randn(calib, *x.shape[1:]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for k, f in files.items()}
    feed = {"input": x.numpy()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for session in sessions.values():
        session.run(None, feed)
    for _ in range(rounds):
        for name, session in sessions.items():  # turns, as for PyTorch
            start = time.perf_counter()
            for _ in range(reps):
                session.run(None, feed)
            times[name].append((time.perf_counter() - start) / reps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "latency_ms": med,
        "latency_ms_all": times,
        "int8_over_fp32": med["onnx int8"] / med["onnx fp32"],
        "bytes": {k: f.stat().st_size for k, f in files.items()},
        "onnxruntime": ort.__version__,
        "scheme": "QDQ; int8 per-channel symmetric weights, uint8 per-tensor activations",
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "1:16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-onnx", action="store_true", help="skip the FP32 vs INT8 ONNX comparison")
    ap.add_argument("--out", type=Path, default=Path("results/inference.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "benchmark": "inference",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_avg_1m_at_start": os.getloadavg()[0],  # other processes on the machine skew absolute times
        "command": "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": {},
    }
    for name in args.models:
        build, shape = MODELS[name]
        dense = build().eval()
        x = torch.randn(shape)
        n, m = maxq.parse_nm(args.patterns[0])
        folded = folded_copy(dense, n, m)
        times = latency({"dense": dense, f"folded {n}:{m}": folded}, x, args.rounds, args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        entry = {
            "input": list(shape),
            "latency_ms": med,
            "latency_ms_all": times,
            "folded_over_dense": med[f"folded {n}:{m}"] / med["dense"],
            "sizes": {"dense_bytes": _bytes(dense.state_dict())},
        }
        for pattern in args.patterns:
            pn, pm = maxq.parse_nm(pattern)
            f = folded_copy(dense, pn, pm)
            with tempfile.TemporaryDirectory() as tmp:
                info = save_compressed(f.state_dict(), Path(tmp) / "m.maxq", pn, pm, f.maxq_layout["layers"])
            entry["sizes"][pattern] = {
                "folded_bytes": _bytes(f.state_dict()),
                "compressed_bytes": info.file_bytes,
                "compressed_over_dense": info.file_bytes / entry["sizes"]["dense_bytes"],
                "sparse_over_bound": info.sparse_over_bound,
                "sparse_layers": len(f.maxq_layout["layers"]),
            }
        if not args.no_onnx:
            with tempfile.TemporaryDirectory() as tmp:
                calib = CALIBRATION[name]
                entry["onnx"] = onnx_latency(folded, x, calib, args.threads, args.rounds, args.reps, Path(tmp))
        result["models"][name] = entry
        print(f"\n{name} (input {'x'.join(map(str, shape))}, {args.threads} threads)")
        for k, v in med.items():
            print(f"  {k:14s} {v:9.2f} ms   x{v / med['dense']:.3f}")
        print(f"  {'file':14s} {'bytes':>12s}  {'/ dense':>8s}  {'sparse vs bound':>15s}")
        print(f"  {'dense':14s} {entry['sizes']['dense_bytes']:12,d}  {1:8.3f}")
        for pattern in args.patterns:
            s = entry["sizes"][pattern]
            ratio = s["folded_bytes"] / entry["sizes"]["dense_bytes"]
            print(f"  {'folded ' + pattern:14s} {s['folded_bytes']:12,d}  {ratio:8.3f}")
            over, bound = s["compressed_over_dense"], s["sparse_over_bound"]
            print(f"  {'compr. ' + pattern:14s} {s['compressed_bytes']:12,d}  {over:8.3f}  {bound:+15.3%}")
        if "onnx" in entry:
            o = entry["onnx"]
            print(f"  onnxruntime {o['onnxruntime']}, folded {n}:{m}, {args.threads} threads:")
            for k, v in o["latency_ms"].items():
                size = o["bytes"][k]
                print(f"  {k:14s} {v:9.2f} ms   x{v / o['latency_ms']['onnx fp32']:.3f}   {size:12,d} bytes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
