"""Why does ``update_every > 1`` hurt at high sparsity? Mask churn and loss around mask updates.

A small CNN is trained dense on Fashion-MNIST for ``--warmup`` steps, then copied once per ``update_every`` value
and trained on with MaxQ at full N:M (no ramp) on the same batches. Every 8 steps we compare the kept set
(Mask > 0) with the one 8 steps before: the fraction of survivors replaced ("churn"). For each variant we also
log the training loss of every step and the mean change of the loss into the steps where the largest
``update_every`` updates its masks (for the others, the same steps serve as a control). Prints a table, writes
JSON and a PNG of the loss curves.

    python benchmarks/mask_churn.py --nm 1:16 --out results/mask_churn.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

import maxq
from maxq.train.data import load_dataset, normalize
from maxq.train.models import build_model

WINDOW = 8  # steps between churn measurements (the largest update_every compared by default)


def kept_sets(sparsifier: maxq.Sparsifier) -> dict[str, torch.Tensor]:
    return {name: mask > 0 for name, mask in sparsifier.named_masks()}


def churn(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of the surviving weights that were replaced (same count kept before and after: N per block)."""
    changed = sum(int((before[k] & ~after[k]).sum()) for k in before)
    kept = sum(int(before[k].sum()) for k in before)
    return changed / kept


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nm", default="1:16")
    ap.add_argument("--every", type=int, nargs="+", default=[1, 8], help="update_every values to compare")
    ap.add_argument("--warmup", type=int, default=300, help="dense steps before sparsifying")
    ap.add_argument("--steps", type=int, default=400, help="sparse steps per variant")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", help="Fashion-MNIST folder (default: the Debian package path)")
    ap.add_argument("--out", type=Path, default=Path("results/mask_churn.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, m = maxq.parse_nm(args.nm)

    splits = load_dataset("fashion-mnist", args.data_dir)
    x_all, y_all = splits.train.tensors
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[(i * 128) % (len(order) - 128) :][:128]
        return normalize(x_all[idx], splits.info), y_all[idx]

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, sp: maxq.Sparsifier | None, i: int) -> float:
        x, y = batch(i)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if sp is not None:
            sp.regularize_()
        opt.step()
        return loss.item()

    base = build_model("cnn_small", splits.info.channels, splits.info.classes)
    opt = torch.optim.SGD(base.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    for i in range(args.warmup):
        step(base, opt, None, i)

    result: dict = {
        "benchmark": "mask_churn",
        "nm": args.nm,
        "warmup": args.warmup,
        "steps": args.steps,
        "lr": args.lr,
        "command": "python benchmarks/mask_churn.py " + " ".join(sys.argv[1:]),
        "variants": {},
    }
    slowest = max(args.every)
    for k in args.every:
        model = copy.deepcopy(base)
        sp = maxq.sparsify_(model, maxq.MaxQConfig(n=n, m=m, schedule="none", update_every=k))
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        losses, churns, previous = [], [], None
        for i in range(args.steps):
            losses.append(step(model, opt, sp, args.warmup + i))
            if i % WINDOW == 0:  # the mask step i used (computed after step i - 1 when i % k == 0)
                current = kept_sets(sp)
                if previous is not None:
                    churns.append(churn(previous, current))
                previous = current
            sp.step()
        # Loss change into the steps where the slowest variant updates its masks (a control for the others).
        jumps = [losses[i] - losses[i - 1] for i in range(slowest, args.steps, slowest)]
        tail = losses[-50:]
        result["variants"][f"update_every={k}"] = {
            "update_every": k,
            "churn_per_8_steps": statistics.fmean(churns),
            "loss_last50": statistics.fmean(tail),
            "loss_jump_at_update": statistics.fmean(jumps),
            "losses": losses,
        }

    print(f"MaxQ {args.nm}, {args.steps} steps after {args.warmup} dense steps, lr {args.lr}")
    print(f"{'variant':18} {'churn/8 steps':>14} {'loss, last 50':>14} {f'loss jump, every {slowest}':>20}")
    for name, v in result["variants"].items():
        jump = f"{v['loss_jump_at_update']:+.3f}"
        print(f"{name:18} {v['churn_per_8_steps']:14.3%} {v['loss_last50']:14.3f} {jump:>20}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, v in result["variants"].items():
        ax.plot(v["losses"], lw=0.8, label=name)
    ax.set(
        xlabel=f"sparse step (after {result['warmup']} dense steps)",
        ylabel="training loss",
        title=f"MaxQ {result['nm']}, full N:M from the first sparse step",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
