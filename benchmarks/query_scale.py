"""How soft are MaxQ's soft masks on a trained model? (tau is absolute, in units of |W|.)

For every sparsified layer of a run's checkpoint, recompute the full-sparsity mask ``B * (1 + Q_f + Q_k)`` from the
trained weights for a few values of tau and report, over the *kept* weights:

* ``median_abs_w``: median |W| (the scale tau is compared against);
* ``soft_f`` / ``soft_k``: among kept weights that the filter / kernel query selects, the fraction whose sigmoid
  is not saturated (< 0.99, i.e. A - t < ~4.6 tau); where it is ~0 the query is a plain 0/1 indicator;
* ``cv``: coefficient of variation (std / mean) of the mask over kept weights. A BatchNorm after the layer absorbs
  any constant scale, so only this spread can change what the network computes.

    python benchmarks/query_scale.py results/runs/main_maxq_1-16_s0 results/runs/main_maxq_2-4_s0 \\
        --out results/query_scale.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from maxq.core.masks import maxq_mask
from maxq.core.nm import parse_nm
from maxq.core.queries import filter_query, kernel_query
from maxq.train.checkpoint import load_checkpoint

SUFFIX = ".parametrizations.weight.original"


def layer_stats(w: torch.Tensor, n: int, m: int, tau: float) -> dict[str, float]:
    """Statistics of the full-sparsity MaxQ mask of one weight ``[O, I]`` or ``[O, I, kh, kw]``."""
    hard = maxq_mask(w, n, m, tau=tau, soft=False).bool()
    mask = maxq_mask(w, n, m, tau=tau)
    a = w.abs().contiguous()
    qf, _ = filter_query(a, n, m, tau)
    kq = kernel_query(a, n, m, tau)
    kept = mask[hard]

    def soft_fraction(q: torch.Tensor) -> float:
        v = q[hard]
        v = v[v > 0]  # kept weights the query also selects (the others have Q = 0 whatever tau is)
        return float((v < 0.99).float().mean()) if v.numel() else float("nan")

    return {
        "median_abs_w": float(a[hard].median()),
        "soft_f": soft_fraction(qf),
        "soft_k": soft_fraction(kq[0]) if kq is not None else float("nan"),
        "mean": float(kept.mean()),
        "cv": float(kept.std() / kept.mean()),
    }


def analyse(run: Path, taus: list[float]) -> list[dict[str, object]]:
    ckpt = load_checkpoint(run / "checkpoint.pt")
    cfg = ckpt["config"]
    n, m = parse_nm(cfg["nm"])
    rows = []
    for key, w in ckpt["model"].items():
        if not key.endswith(SUFFIX):
            continue
        for tau in taus:
            rows.append(
                {"run": run.name, "layer": key[: -len(SUFFIX)], "shape": list(w.shape), "n": n, "m": m, "tau": tau}
                | layer_stats(w.float(), n, m, tau)
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (with checkpoint.pt) of MaxQ trainings")
    ap.add_argument("--tau", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = [row for run in args.runs for row in analyse(run, args.tau)]
    header = ("run", "layer", "shape", "tau", "med|W|", "soft_f", "soft_k", "mean", "cv")
    print("{:24} {:6} {:18} {:>6} {:>7} {:>6} {:>6} {:>5} {:>5}".format(*header))
    for r in rows:
        print(
            f"{r['run']:24} {r['layer']:6} {'x'.join(map(str, r['shape'])):18} {r['tau']:6g} {r['median_abs_w']:7.4f} "
            f"{r['soft_f']:6.3f} {r['soft_k']:6.3f} {r['mean']:5.2f} {r['cv']:5.3f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
