"""Training cost of N:M masks on CUDA: ms per step, ratio to dense and peak memory, eager and with torch.compile.

Per model (default: torchvision ResNet-50 at 224x224, batch 128, and the CIFAR ResNet-18 at 32x32, batch 256), each
variant trains its own copy of the same weights with bf16 autocast, channels_last, SGD (momentum 0.9, weight decay
5e-4) and masks recomputed after every optimizer step (``Sparsifier.step()``, ``update_every=1``):

* ``dense``: no masks.
* ``srste``: hard N:M mask + SR-STE decay.
* ``maxq``: MaxQ after the ramp (``p = 0``).
* ``maxq_ramp``: MaxQ mid-ramp (``p = 0.5``): the mask update also chooses the dense blocks.

Every variant runs eager; those in ``--compile-variants`` also run through ``torch.compile`` of the model (the
mask update stays eager). The compiled forward of srste, maxq and maxq_ramp is the same graph (``W * mask`` with a
straight-through gradient), so by default only ``dense`` and ``maxq`` are compiled: compiling ResNet-50 costs about
a minute each. ``--budget-s`` skips what would not fit (noted in the JSON). The variants take turns, round after
round, so machine noise hits them alike; steps are timed with CUDA events (on the CPU: ``perf_counter``), warmup
excluded; the first compiled steps' wall time is reported as ``compile_s``. Peak memory is the variant's persistent
state (weights, masks, buffers, optimizer state, scratch) plus the largest ``max_memory_allocated`` increase during
its steps. Host syncs of one step are counted apart from those of the mask update. The JSON is rewritten after
every measurement, so a run cut short leaves what it had.

    python benchmarks/train_cost.py --out results/train_cost.json                  # CUDA, the defaults
    python benchmarks/train_cost.py --device cpu --models resnet20:16:4 --rounds 2 --steps 1 \\
        --compile-backend aot_eager --out /tmp/train_cost.json                    # a CPU rehearsal
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import maxq
from maxq._engine.syncs import host_syncs
from maxq.train.models import build_model

RAMP = (0.0, 2.0)  # epochs: progress 1.0 is mid-ramp (p = 0.5), 2.0 after it (p = 0)
VARIANTS: dict[str, tuple[Callable[[int, int], maxq.NMConfig], float] | None] = {
    "dense": None,
    "srste": (lambda n, m: maxq.SRSTEConfig(n=n, m=m), 0.0),
    "maxq": (lambda n, m: maxq.MaxQConfig(n=n, m=m, ramp=RAMP), RAMP[1]),
    "maxq_ramp": (lambda n, m: maxq.MaxQConfig(n=n, m=m, ramp=RAMP), (RAMP[0] + RAMP[1]) / 2),
}
GOAL = 1.10  # MaxQ step / dense step


@dataclass
class ModelSpec:
    name: str
    image: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME[:IMAGE[:BATCH]]``: a maxq.train.models name or a torchvision classifier."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 3:
            raise argparse.ArgumentTypeError(f"expected NAME[:IMAGE[:BATCH]], got {text!r}")
        image = int(parts[1]) if len(parts) > 1 else 224
        batch = int(parts[2]) if len(parts) > 2 else 128
        return cls(parts[0], image, batch)


class Clock:
    """CUDA events on CUDA (no host sync while timing), ``perf_counter`` on the CPU; milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Variant:
    name: str
    model: nn.Module
    sparsifier: maxq.Sparsifier | None
    optimizer: torch.optim.Optimizer
    fns: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)  # mode -> forward

    def train_part(self, mode: str, x: Tensor, y: Tensor) -> None:
        """Everything but the mask update: forward under bf16 autocast, backward, decay, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(self.fns[mode](x), y)
        loss.backward()
        if self.sparsifier is not None:
            self.sparsifier.regularize_()
        self.optimizer.step()

    def mask_part(self) -> None:
        """The mask update from the updated weights (``Sparsifier.step()``, every step)."""
        if self.sparsifier is not None:
            self.sparsifier.step()

    def state_bytes(self) -> int:
        """Persistent memory: parameters, buffers (masks included), optimizer state and mask scratch buffers."""
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        for state in self.optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if isinstance(t, Tensor)})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        workspace = getattr(self.sparsifier, "workspace", None)  # scratch buffers, where the engine keeps them
        return total + (workspace.nbytes() if workspace is not None else 0)


def build_variants(spec: ModelSpec, names: list[str], n: int, m: int, device: torch.device) -> dict[str, Variant]:
    torch.manual_seed(0)
    classes = 1000 if spec.image >= 64 else 10
    base = build_model(spec.name, 3, classes, spec.image)
    variants = {}
    for name in names:
        model = copy.deepcopy(base).to(device, memory_format=torch.channels_last).train()
        sparsifier = None
        if VARIANTS[name] is not None:
            make, progress = VARIANTS[name]
            sparsifier = maxq.sparsify_(model, make(n, m))
            sparsifier.set_progress(progress)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        variants[name] = Variant(name, model, sparsifier, optimizer, {"eager": model})
    return variants


@dataclass
class ModelRun:
    """One model's variants, inputs and the samples measured so far; ``entry`` is its part of the JSON."""

    spec: ModelSpec
    variants: dict[str, Variant]
    x: Tensor
    y: Tensor
    entry: dict[str, Any]
    times: dict[str, list[float]] = field(default_factory=dict)  # "variant/mode" -> step ms
    masks: dict[str, list[float]] = field(default_factory=dict)  # "variant/mode" -> mask update ms
    peaks: dict[str, int] = field(default_factory=dict)  # "variant/mode" -> bytes above the turn's baseline

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return self.entry["rows"]


class Bench:
    """The measurements, in an order that keeps data if time runs out: every model eager first (fast), then the
    compiles in ``--models`` order while the budget allows, each followed by rounds that include its compiled
    modes. The JSON is rewritten after every step of that."""

    def __init__(self, args: argparse.Namespace, device: torch.device, result: dict[str, Any]) -> None:
        self.args, self.device, self.result = args, device, result
        self.clock = Clock(device)
        self.started = time.perf_counter()
        self.sec_per_module = 0.0  # compile seconds per module of the slowest compile so far (the estimate)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        path: Path = self.args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.replace(path)

    def run(self) -> None:
        runs = []
        for spec in self.args.models:
            try:
                runs.append(self.prepare(spec))
            except Exception as exc:  # e.g. out of memory building a model: record it, go on with the next
                self.fail(spec.name, "model", exc)
            self.save()
        for mr in runs:
            self.rounds(mr, self.args.rounds)
        for mr in runs:
            if self.compile(mr):
                self.rounds(mr, self.args.rounds)
        for mr in runs:
            self.summarize(mr)
        self.save()

    def fail(self, model: str, key: str, exc: BaseException) -> None:
        entry = self.result["models"].setdefault(model, {"rows": {}, "skipped": {}, "errors": {}})
        entry["errors"][key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        entry["rows"].pop(key, None)
        print(f"{model} {key} failed:\n{traceback.format_exc()}", file=sys.stderr)
        self.save()

    def prepare(self, spec: ModelSpec) -> ModelRun:
        """Build the variants; eager warmup; the host syncs of one step and of one mask update per variant."""
        args, device = self.args, self.device
        entry: dict[str, Any] = {"image": spec.image, "batch": spec.batch, "rows": {}, "skipped": {}, "errors": {}}
        self.result["models"][spec.name] = entry
        variants = build_variants(spec, args.variants, *maxq.parse_nm(args.nm), device)
        any_model = next(iter(variants.values())).model
        entry["params"] = sum(p.numel() for p in any_model.parameters())
        entry["modules"] = sum(1 for _ in any_model.modules())
        x = torch.randn(spec.batch, 3, spec.image, spec.image, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000 if spec.image >= 64 else 10, (spec.batch,), device=device)
        mr = ModelRun(spec, variants, x, y, entry)
        for v in variants.values():
            key = f"{v.name}/eager"
            try:
                for _ in range(args.warmup):
                    v.train_part("eager", x, y)
                    v.mask_part()
                with host_syncs(device) as step_syncs:
                    v.train_part("eager", x, y)
                with host_syncs(device) as mask_syncs:
                    v.mask_part()
                self.clock.sync()
                mr.rows[key] = {"variant": v.name, "mode": "eager", "host_syncs_step": len(step_syncs)}
                mr.rows[key]["host_syncs_mask_update"] = len(mask_syncs)
            except Exception as exc:  # a variant that cannot run is recorded; the others go on
                self.fail(spec.name, key, exc)
        return mr

    def compile(self, mr: ModelRun) -> bool:
        """Compile the ``--compile-variants`` that fit the budget (the first steps' wall time is the compile)."""
        compiled = False
        for name in self.args.compile_variants:
            v, key = mr.variants.get(name), f"{name}/compiled"
            if v is None or f"{name}/eager" not in mr.rows:
                continue
            estimate = self.sec_per_module * mr.entry["modules"]
            if self.elapsed() + estimate > self.args.budget_s:
                mr.entry["skipped"][key] = f"budget: {self.elapsed():.0f} s used, compile estimated at {estimate:.0f} s"
                self.save()
                continue
            try:
                v.fns["compiled"] = torch.compile(v.model, backend=self.args.compile_backend)
                start = time.perf_counter()
                for _ in range(max(1, self.args.warmup)):
                    v.train_part("compiled", mr.x, mr.y)
                    v.mask_part()
                self.clock.sync()
                seconds = time.perf_counter() - start
                self.sec_per_module = max(self.sec_per_module, seconds / mr.entry["modules"])
                mr.rows[key] = {"variant": name, "mode": "compiled", "compile_s": round(seconds, 2)}
                compiled = True
            except Exception as exc:
                v.fns.pop("compiled", None)
                self.fail(mr.spec.name, key, exc)
            self.save()
        return compiled

    def rounds(self, mr: ModelRun, count: int) -> None:
        """``count`` rounds of turns: every (variant, mode) once per round, the order rotating."""
        order = [key for key in mr.rows if key.split("/")[0] in mr.variants]
        for r in range(count if order else 0):
            if r > 0 and self.elapsed() > self.args.budget_s:
                mr.entry["skipped"]["rounds"] = f"stopped after {r} of {count} rounds: budget"
                break
            for key in order[r % len(order) :] + order[: r % len(order)]:
                if key not in mr.rows:
                    continue
                name, mode = key.split("/")
                try:
                    self.turn(mr, mr.variants[name], mode, key)
                except Exception as exc:
                    self.fail(mr.spec.name, key, exc)
            self.summarize(mr)
            self.save()

    def turn(self, mr: ModelRun, v: Variant, mode: str, key: str) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        marks = []
        for _ in range(self.args.steps):
            start = self.clock.mark()
            v.train_part(mode, mr.x, mr.y)
            mid = self.clock.mark()
            v.mask_part()
            marks.append((start, mid, self.clock.mark()))
        self.clock.sync()
        mr.times.setdefault(key, []).extend(self.clock.ms(a, c) for a, _, c in marks)
        mr.masks.setdefault(key, []).extend(self.clock.ms(b, c) for _, b, c in marks)
        if cuda:
            mr.peaks[key] = max(mr.peaks.get(key, 0), torch.cuda.max_memory_allocated() - base)
        v.optimizer.zero_grad(set_to_none=True)  # gradients would count in the next variant's baseline

    def summarize(self, mr: ModelRun) -> None:
        rows, cuda = mr.rows, self.device.type == "cuda"
        for key, row in rows.items():
            if not mr.times.get(key):
                continue
            state = mr.variants[row["variant"]].state_bytes()
            row["step_ms"] = round(statistics.median(mr.times[key]), 3)
            row["step_ms_all"] = [round(t, 3) for t in mr.times[key]]
            row["mask_update_ms"] = round(statistics.median(mr.masks[key]), 3)
            row["state_mb"] = round(state / 2**20, 1)
            row["peak_mb"] = round((state + mr.peaks.get(key, 0)) / 2**20, 1) if cuda else None
        for row in rows.values():
            dense = rows.get(f"dense/{row['mode']}", {}).get("step_ms")
            dense_eager = rows.get("dense/eager", {}).get("step_ms")
            if "step_ms" in row and dense:
                row["ratio_to_dense"] = round(row["step_ms"] / dense, 3)
            if "step_ms" in row and dense_eager:
                row["ratio_to_dense_eager"] = round(row["step_ms"] / dense_eager, 3)


def table(result: dict[str, Any]) -> str:
    head = f"{'model':<16} {'variant':<10} {'mode':<9} {'step ms':>9} {'x dense':>8} {'mask ms':>8} {'peak MB':>9}"
    lines = [head + f" {'compile s':>10} {'syncs step/mask':>16}"]
    for name, entry in result["models"].items():
        for row in entry["rows"].values():
            if "step_ms" not in row:
                continue
            peak = f"{row['peak_mb']:9.0f}" if row.get("peak_mb") is not None else f"{'-':>9}"
            compile_s = f"{row['compile_s']:10.1f}" if "compile_s" in row else f"{'':>10}"
            syncs = f"{row['host_syncs_step']}/{row['host_syncs_mask_update']}" if "host_syncs_step" in row else ""
            lines.append(
                f"{name:<16} {row['variant']:<10} {row['mode']:<9} {row['step_ms']:9.2f} "
                f"{row.get('ratio_to_dense', float('nan')):8.3f} {row['mask_update_ms']:8.2f} {peak} {compile_s} "
                f"{syncs:>16}"
            )
        for key, why in {**entry["skipped"], **entry["errors"]}.items():
            lines.append(f"{name:<16} {key}: {why}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (also used by tests/test_gpu_check.py to check gpu_check.sh's flags)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a rehearsal)")
    ap.add_argument(
        "--models", nargs="+", type=ModelSpec.parse, default=[ModelSpec.parse(s) for s in ("resnet50:224:128",
        "resnet18_cifar:32:256")], help="NAME[:IMAGE[:BATCH]] (a maxq model or a torchvision classifier)",
    )  # fmt: skip
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--compile-variants", nargs="*", choices=list(VARIANTS), default=["dense", "maxq"])
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of turns (each variant and mode once per round)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per turn")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant and mode before the rounds")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="skip compiles and rounds past this")
    ap.add_argument("--threads", type=int, help="CPU threads for torch")
    ap.add_argument("--out", type=Path, default=Path("results/train_cost.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGTERM, chain=True)  # a timeout shows where it was
    if "dense" not in args.variants:
        ap.error("--variants must include dense (the reference)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/train_cost.py: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "benchmark": "train_cost",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nm": args.nm,
        "settings": {
            "dtype": "bf16 autocast",
            "memory_format": "channels_last",
            "optimizer": "SGD momentum 0.9, weight decay 5e-4",
            "update_every": 1,
            "rounds": args.rounds,
            "steps_per_turn": args.steps,
            "warmup": args.warmup,
            "compile_backend": args.compile_backend,
            "compile_variants": args.compile_variants,
            "budget_s": args.budget_s,
        },
        "goal": f"maxq step <= {GOAL} x dense step",
        "command": "python benchmarks/train_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": {},
    }
    bench = Bench(args, device, result)
    bench.save()
    bench.run()
    failed = any(entry["errors"] for entry in result["models"].values())
    print(table(result))
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
