"""Training-step overhead of the masks: dense vs MaxQ vs SR-STE vs a naive full-sort MaxQ, side by side.

ResNet-18 (torchvision, 10 classes), 32x32 inputs, batch 128, SGD; every variant trains its own copy of the same
model and the variants take turns, round after round, so machine noise hits them alike. A step is
``forward + backward``, ``regularize_()`` (SR-STE decay), ``optimizer.step()`` and ``sparsifier.step()`` (the mask
update, every step). Each phase is timed, so the table breaks a variant's overhead over dense into the mask
computation, applying the mask (the extra forward + backward time) and the decay. Prints a table, writes JSON.

    python benchmarks/mask_overhead.py --threads 2 --out results/mask_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision

import maxq
from maxq.core.reference import ref_sparsifier_masks

PHASES = ("fwd_bwd", "decay", "opt", "mask")


def _naive(sparsifier: maxq.Sparsifier) -> None:
    """Replace the sparsifier's mask update by the full-sort reference, held as whole float masks (what a
    straightforward version does)."""

    def update_masks() -> None:
        with torch.no_grad():
            for name, mask in ref_sparsifier_masks(sparsifier).items():
                sparsifier._layers[name].param.mask = mask

    sparsifier.update_masks = update_masks


@contextlib.contextmanager
def _without_codes() -> Iterator[None]:
    """Sparsify with every mask held as bit planes (the choice is made once, when a layer is sparsified)."""
    from maxq.core import parametrization

    uses_code = parametrization.uses_code
    parametrization.uses_code = lambda *args: False
    try:
        yield
    finally:
        parametrization.uses_code = uses_code


def build_variants(args: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, maxq.Sparsifier | None]]:
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    n, m = maxq.parse_nm(args.nm)
    variants: dict[str, tuple[torch.nn.Module, maxq.Sparsifier | None]] = {"dense": (copy.deepcopy(base), None)}
    ramp = maxq.MaxQConfig(n=n, m=m, ramp=(0, 2))
    specs = {
        "maxq": (ramp, 2.0),
        "maxq_ramp": (ramp, 1.0),
        "srste": (maxq.SRSTEConfig(n=n, m=m), 0.0),
        "srste_planes": (maxq.SRSTEConfig(n=n, m=m), 0.0),
        "maxq_keep": (maxq.MaxQConfig(n=n, m=m, ramp=(0, 2), keep_soft_mask=True), 2.0),
        "maxq_eager": (ramp, 2.0),
        "maxq_naive": (ramp, 2.0),
    }
    if args.update_every > 1:
        specs[f"maxq_every{args.update_every}"] = (
            maxq.MaxQConfig(n=n, m=m, ramp=(0, 2), update_every=args.update_every),
            2.0,
        )
    for name, (cfg, progress) in specs.items():
        if args.only and name not in args.only:
            continue
        model = copy.deepcopy(base)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if name == "srste_planes":  # the masks held as bit planes even where a kept-index code is smaller
            with _without_codes():
                sparsifier = maxq.sparsify_(model, cfg)
        else:
            sparsifier = maxq.sparsify_(model, cfg)
        sparsifier.set_progress(progress)
        if name == "maxq_naive":
            _naive(sparsifier)
        elif name == "maxq_eager":
            sparsifier.fused = False
        variants[name] = (model, sparsifier)
    if args.channels_last:
        variants["dense"] = (variants["dense"][0].to(memory_format=torch.channels_last), None)
    return variants


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of turns (each variant once per round)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per turn")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    ap.add_argument("--update-every", type=int, default=8, help="also time MaxQ with this update_every (1 = skip)")
    ap.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    ap.add_argument("--only", nargs="*", help="time only these variants (plus dense)")
    ap.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall time (default), or this process's CPU time (all threads): robust on a busy shared machine",
    )
    ap.add_argument("--out", type=Path, default=Path("results/mask_overhead.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    variants = build_variants(args)
    x = torch.randn(args.batch_size, 3, 32, 32)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    optimizers = {
        k: torch.optim.SGD(mod.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for k, (mod, _) in variants.items()
    }

    now = time.perf_counter if args.clock == "wall" else time.process_time

    def step(name: str, clock: dict[str, float]) -> None:
        model, sparsifier = variants[name]
        opt = optimizers[name]
        t0 = now()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        t1 = now()
        if sparsifier is not None:
            sparsifier.regularize_()
        t2 = now()
        opt.step()
        t3 = now()
        if sparsifier is not None:
            sparsifier.step()
        t4 = now()
        for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            clock[phase] += dt

    for name in variants:
        for _ in range(args.warmup):
            step(name, dict.fromkeys(PHASES, 0.0))
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in (*PHASES, "total")} for k in variants}
    for r in range(args.rounds):
        for name in variants:
            clock = dict.fromkeys(PHASES, 0.0)
            for _ in range(args.steps):
                step(name, clock)
            for phase in PHASES:
                times[name][phase].append(clock[phase] / args.steps)
            times[name]["total"].append(sum(clock.values()) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = {k: {p: statistics.median(v) * 1e3 for p, v in ts.items()} for k, ts in times.items()}
    dense = med["dense"]
    rows = {}
    for name, ms in med.items():
        rows[name] = {
            "step_ms": ms["total"],
            "ratio_to_dense": ms["total"] / dense["total"],
            "phases_ms": {p: ms[p] for p in PHASES},
            # What the masks add to a dense step, by phase (ms): the mask update, the forward+backward through
            # W * mask, and the SR-STE decay.
            "overhead_ms": {
                "mask_update": ms["mask"],
                "apply_fwd_bwd": ms["fwd_bwd"] - dense["fwd_bwd"],
                "decay": ms["decay"],
                "other": ms["opt"] - dense["opt"],
            },
            "step_ms_all": [t * 1e3 for t in times[name]["total"]],
        }
    result = {
        "benchmark": "mask_overhead",
        "model": "torchvision resnet18, 10 classes, 32x32 input",
        "nm": args.nm,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "channels_last": args.channels_last,
        "clock": args.clock,
        "rounds": args.rounds,
        "steps_per_turn": args.steps,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "command": "python benchmarks/mask_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "variants": rows,
        "notes": {
            "maxq": "MaxQ after the ramp (p=0), masks recomputed every step, fused CPU kernels",
            "maxq_ramp": "MaxQ mid-ramp (p=0.5): adds choosing the dense blocks",
            "srste": "hard N:M mask every step + SR-STE decay (a kept-index code where smaller than the bit plane)",
            "srste_planes": "srste with its masks held as bit planes (the same masks; differs from srste only where "
            "the pattern has a code: 1:4, 1:8, 2:8, 1:16, ...)",
            "maxq_keep": "MaxQ holding its float soft mask between updates (keep_soft_mask=True; same masks)",
            "maxq_eager": "MaxQ through the device-agnostic path (what CUDA runs; same masks)",
            "maxq_naive": "MaxQ with the full-sort reference mask (maxq.core.reference)",
            f"maxq_every{args.update_every}": f"MaxQ recomputing masks every {args.update_every} steps",
        },
    }
    print(f"\n{'variant':<14} {'step ms':>9} {'x dense':>8} {'mask':>8} {'apply':>8} {'decay':>8}")
    for name, row in rows.items():
        o = row["overhead_ms"]
        print(
            f"{name:<14} {row['step_ms']:9.1f} {row['ratio_to_dense']:8.3f} "
            f"{o['mask_update']:8.1f} {o['apply_fwd_bwd']:8.1f} {o['decay']:8.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
