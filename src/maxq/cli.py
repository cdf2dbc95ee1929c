"""Command line: ``maxq train`` (also ``python -m maxq train``; ``torchrun ... -m maxq train`` for DDP)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from . import __version__
from .nm import parse_nm

__all__ = ["main", "build_parser"]

log = logging.getLogger("maxq")


def _nm(text: str) -> str:
    try:
        n, m = parse_nm(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{n}:{m}"


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .config import CONFIGS
    from .masks import BLOCK_ORDERS
    from .recipe import METHODS
    from .schedules import SCHEDULES

    p = sub.add_parser(
        "train",
        help="train a model with MaxQ or a baseline",
        description="Train an N:M-sparse model. Defaults < --config YAML < flags. Writes config.yaml, "
        "metrics.jsonl, checkpoint.pt (every epoch), report.json, curves.png and model_folded.pt to --out.",
        argument_default=argparse.SUPPRESS,  # so that we know which options were given explicitly
    )
    assert set(CONFIGS) <= set(METHODS)
    g = p.add_argument_group("what to train")
    g.add_argument("--config", metavar="YAML", help="recipe file (see configs/)")
    g.add_argument("--method", choices=METHODS, help="default: maxq")
    g.add_argument("--nm", type=_nm, metavar="N:M", help="keep N of every M (default 2:4)")
    g.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100, imagefolder, synthetic")
    g.add_argument("--data-dir", metavar="DIR", help="dataset folder (Fashion-MNIST default: Debian's package)")
    g.add_argument(
        "--model", help="cnn_small (default), cnn, resnet20..56, resnet18_cifar, or any torchvision classifier"
    )
    g.add_argument("--image-size", type=int, help="crop size for imagefolder / ViT (default 224)")
    g.add_argument("--val-split", type=float, metavar="FRAC", help="hold out this share of the training set")
    g.add_argument("--subset", type=int, metavar="N", help="train on the first N training samples")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--no-decay-1d", action=argparse.BooleanOptionalAction, help="no weight decay on 1-D params")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision (default: on with CUDA)")
    g = p.add_argument_group("sparsity")
    g.add_argument("--ramp", type=float, nargs=2, metavar=("START", "END"), help="epochs (default: first 25%%)")
    g.add_argument("--schedule", choices=sorted(SCHEDULES))
    g.add_argument("--per-step", action=argparse.BooleanOptionalAction, help="smooth ramp instead of per-epoch steps")
    g.add_argument("--tau", type=float, help="query temperature (absolute, default 0.01)")
    g.add_argument("--queries", action=argparse.BooleanOptionalAction, help="MaxQ soft queries (default on)")
    g.add_argument("--order", choices=BLOCK_ORDERS, help="which blocks stay dense during the ramp")
    g.add_argument("--decay-lambda", type=float, help="SR-STE decay (default 2e-4)")
    g.add_argument("--update-every", type=int, metavar="K", help="recompute masks every K steps (default 1)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--out", metavar="DIR", help="run folder (default runs/run)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--init", metavar="CKPT", help="start from a dense run's checkpoint.pt or a model_folded.pt")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, help="data-loader workers (imagefolder)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (TTY only)")
    g.add_argument("--variant", help="free-form label stored in the report (used by the study)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .models import model_names
    from .recipe import TrainConfig, load_yaml
    from .trainer import train

    given = {k for k in vars(args) if k not in ("func", "command")}
    options = load_yaml(args.config) if "config" in given else {}
    options.update({k: v for k, v in vars(args).items() if k in given})
    if "variant" in options:
        options["extra"] = {**options.get("extra", {}), "variant": options.pop("variant")}
    if options.get("dataset", "fashion-mnist") not in DATASETS:
        raise ValueError(f"unknown dataset {options['dataset']!r}; choose one of {sorted(DATASETS)}")
    if options.get("model", "cnn_small") not in model_names():
        raise ValueError(f"unknown model {options['model']!r}; choose one of: {', '.join(model_names()[:12])}, ...")
    cfg = TrainConfig.from_dict(options)
    report = train(cfg, given | set(options) if "config" in given else given)
    if report.get("files"):
        nm = "not applicable (dense)" if report["nm_ok"] is None else ("yes" if report["nm_ok"] else "NO")
        print(
            f"\nmaxq train: {report['method']} {report['n']}:{report['m']} {report['model']} on {report['dataset']}: "
            f"top-1 last {report['top1_last']:.2f}%, best {report['top1_best']:.2f}% "
            f"(epoch {report['best_epoch']}); N:M compliant: {nm}; {report['train_time_s']:.0f} s\n"
            f"  report: {report['files']['report']}\n"
            f"  plot:   {report['files']['plot']}\n  model:  {report['files']['folded']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxq", description="N:M sparse training with MaxQ and its baselines.")
    parser.add_argument("--version", action="version", version=f"maxq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.__dict__.pop("verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stdout)
    func: Callable[[argparse.Namespace], int] = args.func
    from .checkpoint import CheckpointError
    from .data import DatasetMissing

    try:
        return func(args)
    except (ValueError, DatasetMissing, CheckpointError) as exc:
        print(f"maxq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
