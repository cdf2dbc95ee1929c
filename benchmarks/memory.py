"""Training memory over dense, per method: what the masks cost, in units of the model's weight bytes.

Each measurement is a fresh process that builds one model, sparsifies it (or not: ``dense``) and runs a few
training steps (forward, backward, ``regularize_()``, optimizer step, ``sparsifier.step()``); its peak resident
memory (``ru_maxrss``) is the figure. The minimum over ``--repeats`` fresh processes is kept (allocator noise
only ever adds). A method's cost is ``(peak - dense peak) / weight bytes`` (``x``), beside the same over the
sparsified layers' weight bytes only. With CUDA (``--device cuda``) the figure is
``torch.cuda.max_memory_allocated`` of the training steps instead (deterministic: one process each; or, with
``--in-process``, every cell in one process, the peak reset per cell and what earlier cells left not counted).

Two allocator settings (``--allocators``), because glibc's ``malloc`` is part of what RSS measures on the CPU:

* ``default``: glibc as it comes. Freed blocks of a few MiB stay in the process's heap once its dynamic mmap
  threshold has risen, and small allocations split them, so short-lived weight-sized buffers can leave the heap
  larger than what is in use at any moment (fragmentation).
* ``mmap``: ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is its own mapping, returned to the
  system when freed, so the peak RSS is the peak of memory actually in use (what
  ``torch.cuda.max_memory_allocated`` measures on a GPU, whose caching allocator reuses freed blocks).

Models: ``linear8`` (8 x (Linear(2048, 2048) + LayerNorm), batch 8), ``resnet50`` (torchvision, batch 16 at
96x96), ``gpt2`` (GPT-2-small architecture built from its config, batch 2 x 64 tokens; needs transformers).

    python benchmarks/memory.py --allocators default,mmap --out results/memory/after.json   # every cell
    python benchmarks/memory.py --models linear8 --dtypes fp32 --repeats 1                   # a quick look
    python benchmarks/memory.py --per-rank --out results/memory/per_rank.json    # mask bytes per rank, world 1 / 2
    python benchmarks/memory.py --where --models resnet50 --dtypes fp32 --optimizers sgd \
        --out results/memory/where_resnet50.json                  # the phase and layer at each method's peak
    python benchmarks/memory.py --device cuda --in-process --optimizers sgd --out memory_cuda.json  # a GPU, one process
    python benchmarks/memory.py --report results/memory/before.json results/memory/after.json \
        results/memory/per_rank.json                                             # the block in docs/RESULTS.md

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
def _build(name: str, tiny: bool = False):
    """The model, a batch maker and its kind; ``tiny``: the same architectures at sizes for a rehearsal on the CPU
    (``linear8`` 64 wide, ``resnet50`` a quarter as wide inside its blocks on 2 images of 32x32, a 2-layer GPT-2
    64 wide over 128 words)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "linear8":
        width = 64 if tiny else 2048
        blocks = []
        for _ in range(8):
            blocks += [nn.Linear(width, width), nn.LayerNorm(width)]
        model = nn.Sequential(*blocks, nn.Linear(width, 10))
        return model, lambda: (torch.randn(8, width), torch.randint(0, 10, (8,))), None
    if name == "resnet50":
        import torchvision

        batch, image = (2, 32) if tiny else (16, 96)
        # tiny: the same blocks, a quarter of the bottleneck width (its 3x3 convolutions 1/16 of the weights)
        model = torchvision.models.resnet50(num_classes=10, width_per_group=16 if tiny else 64)
        return model, lambda: (torch.randn(batch, 3, image, image), torch.randint(0, 10, (batch,))), None
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=128) if tiny else GPT2Config()
        model = GPT2LMHeadModel(config)
        vocab, tokens = model.config.vocab_size, 16 if tiny else 64

        def batch():
            ids = torch.randint(0, vocab, (2, tokens))
            return ids, ids

        return model, batch, "lm"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _unshadow() -> None:
    """This file's folder is on sys.path; its accelerate.py would shadow the package transformers imports."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]


class _Where:
    """Where the peak is (``--where``): a thread samples the resident memory (anonymous and file-backed, from
    ``/proc/self/status``; Linux) every 0.2 ms while hooks name what runs: the phase of the step and, in forward and
    backward, the weight layer (a forward pre-hook; a hook on its output's gradient for backward)."""

    def __init__(self, model: Any) -> None:
        import threading

        import torch

        # the highest sample so far only: a list of every sample would grow in the process it measures
        self.label, self.peak, self.running = "setup", (0.0, 0.0, 0.0, "setup"), True
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) or type(module).__name__ == "Conv1D":
                module.register_forward_pre_hook(lambda m, i, name=name: self.phase(f"forward {name}"))
                module.register_forward_hook(self._backward_label(name))
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def phase(self, label: str) -> None:
        self.label = label

    def _backward_label(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if getattr(output, "requires_grad", False):
                output.register_hook(lambda grad: self.phase(f"backward {name}"))

        return hook

    def _sample(self) -> None:
        while self.running:
            sizes = {}
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        sizes[line.split(":")[0]] = int(line.split()[1]) / 1024
            anon, file = sizes.get("RssAnon", 0.0), sizes.get("RssFile", 0.0)
            if anon + file > self.peak[0]:
                self.peak = (anon + file, anon, file, self.label)
            time.sleep(0.0002)

    def stop(self) -> dict[str, Any]:
        self.running = False
        self.thread.join()
        total, anon, file, label = self.peak
        return {"where_mib": total, "where_anon_mib": anon, "where_file_mib": file, "where": label}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    _unshadow()
    import torch
    from torch import nn

    import maxq

    torch.set_num_threads(int(spec.get("threads", 2)))
    device = torch.device(spec.get("device", "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    # CUDA: the figure is the peak of what this cell allocated (0 before it in a fresh process; in-process, what
    # earlier cells left behind is not counted)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, make_batch, kind = _build(spec["model"], bool(spec.get("tiny")))
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
    where = _Where(model) if spec.get("where") else None
    phase = where.phase if where is not None else lambda label: None
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
        phase("backward")
        loss.backward()
        phase("regularize_")
        if sparsifier is not None:
            sparsifier.regularize_()
        phase("optimizer step")
        opt.step()
        phase("sparsifier step")
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
    if where is not None:
        out.update(where.stop())
    if device.type == "cuda":
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["cuda_before_mib"] = base / 2**20
    if sparsifier is not None and hasattr(sparsifier, "mask_bytes"):
        out["mask_bytes"] = sum(sparsifier.mask_bytes().values())
    return out


# -- mask bytes per rank under FSDP2 (torchrun, gloo) ---------------------------------------------------------------
def per_rank_worker(models: list[str], methods: list[str], nm: str) -> list[dict[str, Any]]:
    """Every rank: each model sparsified, then sharded with ``fully_shard`` (world size > 1) on every sparsified
    layer and the root; one ``step()`` cuts the mask state to the rank's rows. Returns this rank's mask bytes."""
    _unshadow()
    import torch.distributed as dist

    import maxq

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = []
    for name in models:
        for method in methods:
            model, _, _ = _build(name)
            n, m = maxq.parse_nm(nm)
            options: dict[str, Any] = {"n": n, "m": m}
            if method == "maxq":
                options["ramp"] = (0.0, 0.0)
            sp = maxq.sparsify_(model, maxq.make_config(method, **options))
            if world > 1:
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.tensor import Shard

                from maxq.core.layers import is_hf_conv1d

                conv1d = {id(mod.parametrizations.weight.original) for mod in model.modules() if is_hf_conv1d(mod)
                          and hasattr(mod, "parametrizations")}  # fmt: skip

                def placement(param, conv1d=conv1d):  # Conv1D weights [in, out]: shard their outputs
                    return Shard(1) if id(param) in conv1d else None

                for layer in sp.layers:
                    fully_shard(model.get_submodule(layer), shard_placement_fn=placement)
                fully_shard(model, shard_placement_fn=placement)
            sp.step()
            held = sum(sp.mask_bytes().values())
            weights = 0
            for layer in sp.layers:
                w = model.get_submodule(layer).parametrizations.weight.original
                local = w.to_local() if hasattr(w, "to_local") else w
                weights += local.numel() * local.element_size()
            out.append({"model": name, "method": method, "nm": nm, "world": world, "rank": rank,
                        "mask_bytes": held, "local_weight_bytes": weights})  # fmt: skip
            del model, sp
    return out


def per_rank(args: argparse.Namespace) -> dict[str, Any]:
    """World size 1 (this process) and 2 (torchrun, gloo): each rank's mask bytes."""
    import shutil
    import tempfile

    records = per_rank_worker(args.models, [m for m in args.methods if m != "dense"], args.nm)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    with tempfile.TemporaryDirectory() as tmp:
        spec = json.dumps({"models": args.models, "methods": [m for m in args.methods if m != "dense"], "nm": args.nm,
                           "out": tmp})  # fmt: skip
        env = dict(os.environ, MAXQ_QUIET="1", OMP_NUM_THREADS="1")
        cmd = [torchrun, "--standalone", "--nproc-per-node=2", __file__, "--per-rank-worker", spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{proc.stderr[-4000:]}")
        for path in sorted(Path(tmp).glob("rank*.json")):
            records += json.loads(path.read_text())
    return {"records": records}


def _per_rank_main(spec: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    records = per_rank_worker(spec["models"], spec["methods"], spec["nm"])
    Path(spec["out"], f"rank{dist.get_rank()}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


# -- report ----------------------------------------------------------------------------------------------------------
def report(before_path: Path, after_path: Path, per_rank_path: Path | None) -> str:
    """The Markdown block of docs/RESULTS.md section 9 from the two runs (and the per-rank bytes)."""
    before = {_key(r): r for r in json.loads(before_path.read_text())["rows"]}
    after_run = json.loads(after_path.read_text())
    lines = [
        "x = (peak - dense peak) / the model's weight bytes; goal (issue 24, fp32): one-shot <= 0.10, SR-STE <= 0.15,",
        "MaxQ <= 0.35. `default`: glibc as it comes; `mmap`: `MALLOC_MMAP_THRESHOLD_=65536` (freed blocks go back to",
        "the system, so the peak is memory in use). masks x: what maxq holds (`Sparsifier.mask_bytes`) / sparsified",
        "weight bytes.",
        "",
        "| model | dtype | optimizer | method | dense peak MiB | before x (default) | after x (default) | "
        "before x (mmap) | after x (mmap) | masks x | goal met (mmap) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in after_run["rows"] if r["method"] != "dense" and r["allocator"] == "default"]
    dense = {_key(r)[:3]: r for r in after_run["rows"] if r["method"] == "dense" and r["allocator"] == "default"}

    def get(table: dict, row: dict, allocator: str, field: str) -> Any:
        found = table.get(_key({**row, "allocator": allocator}))
        return "" if found is None else found.get(field, "")

    after = {_key(r): r for r in after_run["rows"]}
    for r in rows:
        live = get(after, r, "mmap", "x_weights")
        goal = GOALS.get(r["method"])
        met = "" if live == "" or r["dtype"] != "fp32" else ("yes" if live <= goal else "**no**")
        base = dense.get(_key(r)[:3], {})
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {r['method']} | {base.get('peak_mib', '')} | "
            f"{get(before, r, 'default', 'x_weights')} | {r.get('x_weights', '')} | "
            f"{get(before, r, 'mmap', 'x_weights')} | {live} | {r.get('mask_x', '')} | {met} |"
        )
    if per_rank_path is not None and per_rank_path.is_file():
        records = json.loads(per_rank_path.read_text())["records"]
        lines += [
            "",
            "Mask bytes held per rank (FSDP2 `fully_shard`, gloo; world size 1 = one process, unsharded):",
            "",
            "| model | method | world 1 | world 2, rank 0 | world 2, rank 1 | ratio |",
            "|---|---|---|---|---|---|",
        ]
        single = {(r["model"], r["method"]): r for r in records if r["world"] == 1}
        for (model, method), one in single.items():
            ranks = sorted((r for r in records if r["world"] == 2 and (r["model"], r["method"]) == (model, method)),
                           key=lambda r: r["rank"])  # fmt: skip
            if len(ranks) != 2:
                continue
            ratio = max(r["mask_bytes"] for r in ranks) / one["mask_bytes"]
            lines.append(f"| {model} | {method} | {one['mask_bytes']:,} | {ranks[0]['mask_bytes']:,} | "
                         f"{ranks[1]['mask_bytes']:,} | {ratio:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# -- driver --------------------------------------------------------------------------------------------------------
ALLOCATORS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell in this process (``--in-process``): on CUDA ``max_memory_allocated`` from a reset peak, what earlier
    cells left freed first. On the CPU the peak RSS of this process so far: a rehearsal of the code, not a
    measurement (RSS only grows)."""
    import gc

    import torch

    gc.collect()  # a sparsified model holds reference cycles (parametrizations, hooks): free the last cell's
    if spec.get("device", "cpu").startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return worker(spec)


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
                            **({"tiny": True} if args.tiny else {}),
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    ap.add_argument("--optimizers", type=lambda s: s.split(","), default=["sgd", "adamw"])
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per cell (the minimum is kept)")
    ap.add_argument(
        "--allocators",
        type=lambda s: s.split(","),
        default=["default"],
        help="glibc settings to measure under: default, mmap (see the module docstring); mmap runs once per cell",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu: peak RSS; cuda: torch.cuda.max_memory_allocated")
    ap.add_argument("--in-process", action="store_true",
                        help="every cell in this process (CUDA: the peak is reset per cell; no fresh processes "
                        "needed); on the CPU a rehearsal only (RSS only grows)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny sizes of the same models (a CPU rehearsal)")
    ap.add_argument("--label", default="", help="a name for this run (e.g. before/after), kept in the JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (after every cell)")
    ap.add_argument("--resume", action="store_true", help="keep the cells --out already holds; measure the rest")
    ap.add_argument("--per-rank", action="store_true", help="mask bytes per rank at world size 1 and 2 (FSDP2)")
    ap.add_argument("--where", action="store_true",
                        help="where each cell peaks: the step's phase and layer at the peak, and the resident "
                        "memory then (anonymous / file-backed); a fresh process per cell, mmap setting")  # fmt: skip
    ap.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="BEFORE AFTER [PER_RANK]: write the table into docs/RESULTS.md and print it")  # fmt: skip
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--per-rank-worker", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser()
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.per_rank_worker is not None:
        _per_rank_main(json.loads(args.per_rank_worker))
        return {}
    if args.report:
        from study import _replace_block

        block = report(args.report[0], args.report[1], args.report[2] if len(args.report) > 2 else None)
        comment = "<!-- generated by benchmarks/memory.py --report; edit the surrounding docs, not this block -->\n"
        _replace_block(Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md", "memory", comment + block)
        print(block)
        return {}
    if args.where:
        return where(args)
    if args.per_rank:
        result = per_rank(args)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["records"], indent=1))
        return result
    if "dense" not in args.methods:
        args.methods = ["dense", *args.methods]
    unknown = sorted(set(args.allocators) - set(ALLOCATORS))
    if unknown:
        ap.error(f"unknown allocator setting(s) {unknown}; choose from {sorted(ALLOCATORS)}")
    if args.in_process and args.allocators != ["default"]:
        ap.error("--in-process measures under this process's allocator: leave --allocators at default")
    if args.in_process:
        _unshadow()
    records: list[dict[str, Any]] = []
    if args.resume and args.out is not None and args.out.is_file():  # keep the cells measured so far
        stored = json.loads(args.out.read_text())
        if stored.get("figure", _figure_name(args)) != _figure_name(args) or stored.get("tiny", False) != args.tiny:
            ap.error(
                f"--resume: {args.out} holds {stored.get('figure')!r}{' (tiny)' if stored.get('tiny') else ''}, "
                f"this run measures {_figure_name(args)!r}{' (tiny)' if args.tiny else ''}: pass another --out"
            )
        records = stored["records"]
    done = {_key(r) for r in records}
    cells = [(cell, allocator) for cell in _cells(args) for allocator in args.allocators]
    for index, (cell, allocator) in enumerate(cells, 1):
        if _key({**cell, "allocator": allocator}) in done:
            continue
        # The mmap setting measures memory in use (deterministic up to a few pages): one process is enough.
        if args.in_process:
            runs = [_measure_here(cell)]
        else:
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


def where(args: argparse.Namespace) -> dict[str, Any]:
    """``--where``: each cell once, in a fresh process (mmap setting), with the phase and layer at its peak."""
    if "dense" not in args.methods:
        args.methods = ["dense", *args.methods]
    records = [_measure({**cell, "where": True}, "mmap") for cell in _cells(args)]
    dense = {_key(r)[:3]: r for r in records if r["method"] == "dense"}
    lines = ["| model | dtype | optimizer | method | peak MiB | anon MiB | file MiB | extra anon MiB | "
             "extra file MiB | masks MiB | at |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        base = dense[_key(r)[:3]]
        anon, file = r["where_anon_mib"] - base["where_anon_mib"], r["where_file_mib"] - base["where_file_mib"]
        extra = f"{anon:.1f} | {file:.1f}" if r["method"] != "dense" else " | "
        masks = f"{r['mask_bytes'] / 2**20:.1f}" if "mask_bytes" in r else ""
        lines.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {r['method']} | {r['where_mib']:.1f} | "
                     f"{r['where_anon_mib']:.1f} | {r['where_file_mib']:.1f} | {extra} | {masks} | "
                     f"{r['where']} |")  # fmt: skip
    print("\n".join(lines))
    result = {"command": " ".join(sys.argv), "records": records}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _figure_name(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return "cuda max_memory_allocated" + (" (in-process, peak reset per cell)" if args.in_process else "")
    if args.in_process:
        return "peak RSS of one process across cells (a rehearsal: not a measurement)"
    return "peak RSS (min of repeats)"


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
        "figure": _figure_name(args),
        "tiny": args.tiny,
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
