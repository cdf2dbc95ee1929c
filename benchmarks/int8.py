"""FP32 vs INT8 (and FP16) accuracy of exported study models: does MaxQ quantize as well as it claims?

    python benchmarks/int8.py --runs results/runs --out results/int8.json

For each study run (default: ``main_{maxq,srste}_{2-4,1-16}_s{0,1,2}``) its ``model_folded.pt`` is exported as
``maxq export --onnx --fp16 --int8 --compressed`` does (INT8: QDQ, int8 per-channel symmetric weights, uint8
per-tensor activations, calibrated on 512 Fashion-MNIST *training* images) into ``<run>/export/``, and every file is
evaluated on the test set (10,000 images) with ``maxq eval``'s function: PyTorch for the folded model, onnxruntime
(CPU) for the ONNX files. Prints a markdown table (mean ± std over seeds; the INT8 - FP32 gap paired by seed) next
to the paper repository's ResNet-50 2:4 ImageNet numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from maxq.deploy.artifacts import model_from
from maxq.deploy.evaluate import evaluate_file
from maxq.deploy.export import export_model

#: ResNet-50 2:4 on ImageNet, top-1 before / after INT8 post-training quantization (the MaxQ authors' repository).
PAPER_REPO = {"maxq": (77.58, 77.14), "srste": (76.90, 76.61)}
DEFAULT_IDS = [f"main_{m}_{nm}_s{s}" for m in ("maxq", "srste") for nm in ("2-4", "1-16") for s in (0, 1, 2)]


def run_one(folder: Path, calib: int, threads: int, data_dir: str | None) -> dict[str, Any]:
    """Export one run to every kind (replacing earlier exports) and evaluate each file."""
    report = json.loads((folder / "report.json").read_text())
    out = folder / "export"
    files = {
        "onnx": out / "model.onnx",
        "fp16": out / "model.fp16.onnx",
        "int8": out / "model.int8.onnx",
        "compressed": out / "model.maxq",
    }
    model, arch = model_from(folder)
    started = time.perf_counter()
    result = export_model(model, arch, source=str(folder), calib_samples=calib, data_dir=data_dir, overwrite=True,
                          **files)  # fmt: skip
    if not result.ok:
        raise SystemExit(f"{folder}: export failed: {result.problem}")
    export_s = time.perf_counter() - started
    scores = {"folded": evaluate_file(folder / "model_folded.pt", data_dir=data_dir, threads=threads)}
    for kind in ("onnx", "fp16", "int8", "compressed"):
        scores[kind] = evaluate_file(files[kind], data_dir=data_dir, threads=threads)
    int8 = result.summary["int8"]
    return {
        "id": folder.name,
        "method": report["method"],
        "nm": f"{report['n']}:{report['m']}",
        "seed": report["seed"],
        "report_top1": report["top1_folded"],
        "top1": {k: v.top1 for k, v in scores.items()},
        "top5": {k: v.top5 for k, v in scores.items()},
        "loss": {k: v.loss for k, v in scores.items()},
        "bytes": {
            "folded_pt": (folder / "model_folded.pt").stat().st_size,
            **{k: f.stat().st_size for k, f in files.items()},
        },
        "int8": {k: int8[k] for k in ("kept_rounded_to_zero", "kept_total", "top1_agreement_with_fp32", "nm_ok")},
        "export_s": export_s,
    }


def _ms(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per method and pattern, FP32 / FP16 / INT8 top-1 and the INT8 - FP32 gap (paired by seed)."""
    lines = [
        "| model | seeds | FP32 ONNX top-1 | FP16 ONNX | INT8 ONNX | INT8 - FP32 (paired) | kept weights -> 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("maxq", "srste"):
        for nm in ("2:4", "1:16"):
            rows = [r for r in records if r["method"] == method and r["nm"] == nm]
            if not rows:
                continue
            fp32 = [r["top1"]["onnx"] for r in rows]
            gaps = [r["top1"]["int8"] - r["top1"]["onnx"] for r in rows]
            zeroed = sum(r["int8"]["kept_rounded_to_zero"] for r in rows) / sum(r["int8"]["kept_total"] for r in rows)
            lines.append(
                f"| {method} {nm} (cnn_small, Fashion-MNIST) | {len(rows)} | {_ms(fp32)} | "
                f"{_ms([r['top1']['fp16'] for r in rows])} | {_ms([r['top1']['int8'] for r in rows])} | "
                f"**{statistics.fmean(gaps):+.2f}** (per seed {', '.join(f'{g:+.2f}' for g in gaps)}) | {zeroed:.2%} |"
            )
    for method, (before, after) in PAPER_REPO.items():
        lines.append(
            f"| {method} 2:4 (ResNet-50, ImageNet; paper repo) | 1 | {before:.2f} | — | {after:.2f} | "
            f"**{after - before:+.2f}** | — |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("results/runs"), help="folder of the study's run folders")
    ap.add_argument("--ids", nargs="+", default=DEFAULT_IDS)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", help="Fashion-MNIST folder (default: Debian's package)")
    ap.add_argument("--out", type=Path, default=Path("results/int8.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [i for i in args.ids if not (args.runs / i / "report.json").exists()]
    if missing:
        raise SystemExit(
            f"missing finished runs in {args.runs}: {missing}; train them with the study config "
            f"(python benchmarks/study.py --config configs/study.yaml) or their results/runs/<id>.yaml"
        )
    records = []
    for run_id in args.ids:
        record = run_one(args.runs / run_id, args.calib_samples, args.threads, args.data_dir)
        records.append(record)
        t = record["top1"]
        print(f"{run_id}: folded {t['folded']:.2f}  onnx {t['onnx']:.2f}  fp16 {t['fp16']:.2f}  int8 {t['int8']:.2f}")
    import onnxruntime

    result = {
        "benchmark": "int8",
        "command": "python benchmarks/int8.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "calib_samples": args.calib_samples,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "records": records,
        "table": table(records),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + result["table"] + f"\n\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
