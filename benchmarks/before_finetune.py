"""What the first forward sees: accuracy of a trained dense model right after ``sparsify_``, before any step.

    python benchmarks/before_finetune.py results/finetune/runs/parent/checkpoint.pt     # -> results/finetune/

For every pattern and method the script loads the checkpoint, sparsifies it as ``maxq train --init`` would, and
evaluates it in eval mode on the test set and the held-out val split of the checkpoint's own recipe: magnitude
pruning (``oneshot``; ``srste`` computes the same mask at step 0), and MaxQ -- paper, without queries, and the two
warm-ups of the soft factor (our addition, METHOD.md §8) -- at ramp positions p = 1 (the start: every block dense)
and 0 (every block N:M). Writes ``before_finetune.json`` next to the checkpoint's study records and prints a
Markdown table. No training; a couple of minutes on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import maxq
from maxq.train.checkpoint import load_checkpoint
from maxq.train.data import load_dataset
from maxq.train.loop import Processes, _loader, evaluate
from maxq.train.models import build_model
from maxq.train.recipe import TrainConfig
from study import sha256_file  # the study's records hash the same file the same way (benchmarks/ is on sys.path)

#: (label, method, options) measured; MaxQ rows are measured at every ramp position of ``POSITIONS``.
ARMS: list[tuple[str, str, dict[str, Any]]] = [
    ("magnitude (oneshot / srste at step 0)", "oneshot", {}),
    ("maxq (paper)", "maxq", {}),
    ("maxq, no queries", "maxq", {"queries": False}),
    ("maxq, soft_warmup=ramp", "maxq", {"soft_warmup": "ramp"}),
    ("maxq, soft_warmup=normalize", "maxq", {"soft_warmup": "normalize"}),
]
POSITIONS = (1.0, 0.0)  # dense fraction p: the start of the ramp, its end (--positions adds others, e.g. 0.5)


def measure(
    checkpoint: Path, patterns: list[str], threads: int = 1, positions: tuple[float, ...] = POSITIONS
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict({**state["config"], "resume": False, "extend": False})
    splits = load_dataset(cfg.dataset, cfg.data_dir, val_split=cfg.val_split, subset=cfg.subset)
    info, procs, device = splits.info, Processes(), torch.device("cpu")
    test = _loader(splits.test, cfg, procs, train=False, in_memory=info.in_memory)
    val = _loader(splits.val, cfg, procs, train=False, in_memory=info.in_memory) if splits.val is not None else None

    def model() -> torch.nn.Module:
        net = build_model(cfg.model, info.channels, info.classes, info.image_size)
        net.load_state_dict(state["model"])
        return net

    def score(net: torch.nn.Module) -> dict[str, float]:
        out = {"test_top1": evaluate(net, test, info, device, procs)["top1"]}
        if val is not None:
            out["val_top1"] = evaluate(net, val, info, device, procs)["top1"]
        return out

    rows = [{"label": "parent (dense)", "nm": None, "p": None, **score(model())}]
    for nm in patterns:
        n, m = (int(x) for x in nm.split(":"))
        for label, method, options in ARMS:
            for p in positions if method == "maxq" else (None,):
                net = model()
                extra = {"ramp": (0.0, 2.0), "per_step": True} if method == "maxq" else {}
                sparsifier = maxq.sparsify_(net, maxq.make_config(method, n=n, m=m, **extra, **options))
                if p is not None:
                    sparsifier.set_progress(2.0 * (1.0 - p))  # linear ramp over (0, 2): p = 1 - t / 2
                    assert abs(sparsifier.dense_fraction - p) < 1e-9
                scale = sum(r.mean_soft_scale for r in sparsifier.report().sparsified) / len(sparsifier.layers)
                rows.append({"label": label, "nm": nm, "p": p, "mean_soft_scale": scale, **score(net)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "checkpoint": str(checkpoint),
        "sha256": sha256_file(checkpoint),
        "epochs": state["epoch"],
        "rows": rows,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown(result: dict[str, Any]) -> str:
    parent = result["rows"][0]
    lines = [
        f"Parent: test {parent['test_top1']:.2f}%, val {parent.get('val_top1', float('nan')):.2f}% "
        f"(sha256 {result['sha256'][:12]}...). Before-fine-tuning top-1 (%), test / val, eval mode:",
        "",
        "| model | pattern | p = 1 (ramp start) | p = 0.5 | p = 0 (all N:M) | mean kept mask value at p = 1 |",
        "|---|---|---|---|---|---|",
    ]
    cells: dict[tuple[str, str], dict[Any, dict[str, Any]]] = {}
    for r in result["rows"][1:]:
        cells.setdefault((r["label"], r["nm"]), {})[r["p"]] = r
    for (label, nm), by_p in cells.items():

        def cell(r: dict[str, Any] | None) -> str:
            return "—" if r is None else f"{r['test_top1']:.2f} / {r.get('val_top1', float('nan')):.2f}"

        if None in by_p:  # no ramp: the mask of the first step
            lines.append(f"| {label} | {nm} | — | — | {cell(by_p[None])} | 1.000 |")
        else:
            scale = by_p[1.0]["mean_soft_scale"]
            lines.append(
                f"| {label} | {nm} | {cell(by_p.get(1.0))} | {cell(by_p.get(0.5))} | {cell(by_p.get(0.0))} "
                f"| {scale:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--patterns", nargs="+", default=["2:4", "1:16"])
    ap.add_argument("--out", type=Path, help="JSON file (default: before_finetune.json two folders above the run's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--positions", type=float, nargs="+", default=list(POSITIONS), help="ramp positions p to measure")
    args = ap.parse_args(argv)
    result = measure(args.checkpoint, args.patterns, args.threads, tuple(args.positions))
    out = args.out or args.checkpoint.parent.parent.parent / "before_finetune.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
