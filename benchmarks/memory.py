"""Training memory over dense, per method: what the masks cost, in units of the model's weight bytes.

Each measurement is a fresh process that builds one model, sparsifies it (or not: ``dense``) and runs a few
training steps (forward, backward, ``regularize_()``, optimizer step, ``sparsifier.step()``); its peak resident
memory (``ru_maxrss``) is the figure. The minimum over ``--repeats`` fresh processes is kept (allocator noise
only ever adds). A method's cost is ``(peak - dense peak) / weight bytes`` (``x``), beside the same over the
sparsified layers' weight bytes only. With CUDA (``--device cuda``) the figure is
``torch.cuda.max_memory_allocated`` of the training steps instead (deterministic: one process each).

Two allocator settings (``--allocators``), because glibc's ``malloc`` is part of what RSS measures on the CPU:

* ``default``: glibc as it comes. Freed blocks of a few MiB stay in the process's heap once its dynamic mmap
  threshold has risen, and small allocations split them, so short-lived weight-sized buffers can leave the heap
  larger than what is in use at any moment (fragmentation).
* ``mmap``: ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is its own mapping, returned to the
  system when freed, so the peak RSS is the peak of memory actually in use (what
  ``torch.cuda.max_memory_allocated`` measures on a GPU, whose caching allocator reuses freed blocks).

Models: ``linear8`` (8 x (Linear(2048, 2048) + LayerNorm), batch 8), ``resnet50`` (torchvision, batch 16 at
96x96), ``gpt2`` (GPT-2-small architecture built from its config, batch 2 x 64 tokens; needs transformers).

    python benchmarks/memory.py --out results/memory/after.json            # every model, fp32 + bf16, SGD + AdamW
    python benchmarks/memory.py --models linear8 --dtypes fp32 --repeats 1  # a quick look

Prints a Markdown table and writes JSON (one record per cell, with the raw peaks of every repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("linear8", "resnet50", "gpt2")
METHODS = ("dense", "oneshot", "srste", "maxq")
GOALS = {"oneshot": 0.10, "srste": 0.15, "maxq": 0.35}  # issue 24's bounds, in weight bytes (fp32)


# -- worker: one measurement in this process ---------------------------------------------------------------------
def _build(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "linear8":
        blocks = []
        for _ in range(8):
            blocks += [nn.Linear(2048, 2048), nn.LayerNorm(2048)]
        model = nn.Sequential(*blocks, nn.Linear(2048, 10))
        return model, lambda: (torch.randn(8, 2048), torch.randint(0, 10, (8,))), None
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(num_classes=10)
        return model, lambda: (torch.randn(16, 3, 96, 96), torch.randint(0, 10, (16,))), None
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config())
        vocab = model.config.vocab_size

        def batch():
            ids = torch.randint(0, vocab, (2, 64))
            return ids, ids

        return model, batch, "lm"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    # This file's folder is on sys.path; its accelerate.py would shadow the accelerate package transformers needs.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    import torch
    from torch import nn

    import maxq

    torch.set_num_threads(int(spec.get("threads", 2)))
    device = torch.device(spec.get("device", "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model, make_batch, kind = _build(spec["model"])
    model = model.to(device=device, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sparsifier = None
    if spec["method"] != "dense":
        n, m = maxq.parse_nm(spec["nm"])
        options: dict[str, Any] = {"n": n, "m": m}
        if spec["method"] == "maxq":
            options["ramp"] = (0.0, 0.0)  # the ramp's end: every block N:M, every query on
        sparsifier = maxq.sparsify_(model, maxq.make_config(spec["method"], **options))
    sparse_bytes = 0
    if sparsifier is not None:
        modules = dict(model.named_modules())
        for name in sparsifier.layers:
            module = modules[name]
            original = module.parametrizations.weight.original
            sparse_bytes += original.numel() * original.element_size()
    params = [p for p in model.parameters() if p.requires_grad]
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(int(spec["steps"])):
        x, y = make_batch()
        x, y = x.to(device), y.to(device)
        if dtype != torch.float32 and x.is_floating_point():
            x = x.to(dtype)
        opt.zero_grad(set_to_none=True)
        if kind == "lm":
            loss = model(input_ids=x, labels=y).loss
        else:
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if sparsifier is not None:
            sparsifier.regularize_()
        opt.step()
        if sparsifier is not None:
            sparsifier.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {
        **spec,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weight_bytes": weight_bytes,
        "sparse_weight_bytes": sparse_bytes,
        "seconds": seconds,
        "loss": float(loss.detach()),
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if sparsifier is not None and hasattr(sparsifier, "mask_bytes"):
        out["mask_bytes"] = sum(sparsifier.mask_bytes().values())
    return out


# -- driver --------------------------------------------------------------------------------------------------------
ALLOCATORS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def _measure(spec: dict[str, Any], allocator: str = "default") -> dict[str, Any]:
    env = dict(os.environ, MAXQ_QUIET="1", **ALLOCATORS[allocator])
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    for model in args.models:
        for dtype in args.dtypes:
            for optimizer in args.optimizers:
                for method in args.methods:
                    cells.append(
                        {
                            "model": model,
                            "dtype": dtype,
                            "optimizer": optimizer,
                            "method": method,
                            "nm": args.nm,
                            "steps": args.steps,
                            "threads": args.threads,
                            "device": args.device,
                        }
                    )
    return cells


def _figure(record: dict[str, Any]) -> float:
    return record["cuda_peak_mib"] if "cuda_peak_mib" in record else record["peak_rss_mib"]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dtype, optimizer, method): the peak (MiB), the extra over dense, and ``x`` against the
    model's weight bytes and against the sparsified layers' weight bytes."""

    def key(r: dict[str, Any]) -> tuple:
        return r["model"], r["dtype"], r["optimizer"], r.get("allocator", "default")

    dense = {key(r): r for r in records if r["method"] == "dense"}
    rows = []
    for r in records:
        base = dense.get(key(r))
        row = {k: r[k] for k in ("model", "dtype", "optimizer", "method", "nm")}
        row["allocator"] = r.get("allocator", "default")
        row["peak_mib"] = round(r["peak_mib"], 1)
        if base is not None and r["method"] != "dense":
            extra = r["peak_mib"] - base["peak_mib"]
            row["extra_mib"] = round(extra, 1)
            row["x_weights"] = round(extra * 2**20 / r["weight_bytes"], 3)
            if r.get("sparse_weight_bytes"):
                row["x_sparsified"] = round(extra * 2**20 / r["sparse_weight_bytes"], 3)
            if "mask_bytes" in r and r.get("sparse_weight_bytes"):
                row["mask_x"] = round(r["mask_bytes"] / r["sparse_weight_bytes"], 4)
            goal = GOALS.get(r["method"])
            row["goal"] = goal
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    columns = ("model", "dtype", "optimizer", "allocator", "method", "peak_mib", "extra_mib", "x_weights",
               "x_sparsified", "mask_x")  # fmt: skip
    names = ("model", "dtype", "optimizer", "allocator", "method", "peak MiB", "extra MiB", "x weights",
             "x sparsified", "masks x")  # fmt: skip
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.0f}" if c == "peak_mib" else str(r.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    parser.add_argument("--optimizers", type=lambda s: s.split(","), default=["sgd", "adamw"])
    parser.add_argument("--nm", default="2:4")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell (the minimum is kept)")
    parser.add_argument(
        "--allocators",
        type=lambda s: s.split(","),
        default=["default"],
        help="glibc settings to measure under: default, mmap (see the module docstring); mmap runs once per cell",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default="", help="a name for this run (e.g. before/after), kept in the JSON")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (after every cell)")
    parser.add_argument("--resume", action="store_true", help="keep the cells --out already holds; measure the rest")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if "dense" not in args.methods:
        args.methods = ["dense", *args.methods]
    unknown = sorted(set(args.allocators) - set(ALLOCATORS))
    if unknown:
        parser.error(f"unknown allocator setting(s) {unknown}; choose from {sorted(ALLOCATORS)}")
    records: list[dict[str, Any]] = []
    if args.resume and args.out is not None and args.out.is_file():  # keep the cells measured so far
        records = json.loads(args.out.read_text())["records"]
    done = {_key(r) for r in records}
    cells = [(cell, allocator) for cell in _cells(args) for allocator in args.allocators]
    for index, (cell, allocator) in enumerate(cells, 1):
        if _key({**cell, "allocator": allocator}) in done:
            continue
        # The mmap setting measures memory in use (deterministic up to a few pages): one process is enough.
        repeats = 1 if args.device.startswith("cuda") or allocator == "mmap" else args.repeats
        runs = [_measure(cell, allocator) for _ in range(repeats)]
        best = min(runs, key=_figure)
        record = {
            **best,
            "allocator": allocator,
            "peak_mib": _figure(best),
            "peaks_mib": [round(_figure(r), 1) for r in runs],
        }
        records.append(record)
        print(
            f"[{index}/{len(cells)}] {cell['model']} {cell['dtype']} {cell['optimizer']} {allocator} "
            f"{cell['method']}: {record['peak_mib']:.0f} MiB (runs {record['peaks_mib']})",
            file=sys.stderr,
            flush=True,
        )
        _write(args, argv, records)  # after every cell: an interrupted run resumes with --resume
    result = _write(args, argv, records)
    print(table(result["rows"]))
    return result


def _key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k, "default") for k in ("model", "dtype", "optimizer", "method", "nm", "allocator"))


def _write(args: argparse.Namespace, argv: list[str] | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    import maxq

    rows = summarize(records)
    result = {
        "label": args.label,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "maxq": maxq.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "figure": "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (min of repeats)",
        "records": records,
        "rows": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()
