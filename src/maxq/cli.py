"""Command line: ``maxq train | export | verify | eval`` (also ``python -m maxq ...``; ``torchrun -m maxq train``:
DDP, or FSDP2 with ``--fsdp``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__
from .core.nm import parse_nm

__all__ = ["main", "build_parser"]

log = logging.getLogger("maxq")


def _nm(text: str) -> str:
    try:
        n, m = parse_nm(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{n}:{m}"


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .calibrate.config import CALIBRATION_METHODS
    from .core.config import CONFIGS
    from .core.masks import BLOCK_ORDERS, SOFT_WARMUPS
    from .core.schedules import SCHEDULES
    from .train.data import DATASETS
    from .train.models import MODELS
    from .train.recipe import METHODS

    p = sub.add_parser(
        "train",
        help="train a model with MaxQ or a baseline",
        description="Train an N:M-sparse model. Defaults < --config YAML < flags. Writes config.yaml, "
        "metrics.jsonl, checkpoint.pt (every epoch), report.json, curves.png and model_folded.pt to --out. "
        "Ctrl-C (or SIGTERM) stops it resumably: it prints the command that continues (exit code 130).",
        argument_default=argparse.SUPPRESS,  # so that we know which options were given explicitly
    )
    assert set(CONFIGS) <= set(METHODS)
    g = p.add_argument_group("what to train")
    g.add_argument("--config", metavar="YAML", help="recipe file (see configs/)")
    g.add_argument("--method", choices=METHODS, help="default: maxq")
    g.add_argument("--nm", type=_nm, metavar="N:M", help="keep N of every M (default 2:4)")
    g.add_argument("--dataset", help=f"{', '.join(DATASETS)}")
    g.add_argument("--data-dir", metavar="DIR", help="dataset folder (Fashion-MNIST default: Debian's package)")
    g.add_argument("--model", help=f"{', '.join(sorted(MODELS))}, or any torchvision classifier by name")
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
    decay_1d = g.add_mutually_exclusive_group()  # one option, two spellings (not --no-no-decay-1d)
    decay_1d.add_argument(
        "--no-decay-1d", dest="no_decay_1d", action="store_const", const=True, help="no weight decay on 1-D params"
    )
    decay_1d.add_argument(
        "--decay-1d", dest="no_decay_1d", action="store_const", const=False, help="weight decay on 1-D params (default)"
    )
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision (default: on with CUDA)")
    g.add_argument("--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype with --amp (default float16)")
    g.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, help="model and inputs in channels_last format"
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the training forward (no graph breaks; masks are updated outside it)",
    )
    g = p.add_argument_group("sparsity")
    g.add_argument(
        "--ramp",
        type=float,
        nargs=2,
        metavar=("START", "END"),
        help="epochs (default: the first 25%% of the run, per step where the per-epoch staircase cannot finish it)",
    )
    g.add_argument("--schedule", choices=sorted(SCHEDULES))
    g.add_argument("--per-step", action=argparse.BooleanOptionalAction, help="smooth ramp instead of per-epoch steps")
    g.add_argument("--tau", type=float, help="query temperature (absolute, default 0.01)")
    g.add_argument("--queries", action=argparse.BooleanOptionalAction, help="MaxQ soft queries (default on)")
    g.add_argument("--order", choices=BLOCK_ORDERS, help="which blocks stay dense during the ramp")
    g.add_argument(
        "--soft-warmup",
        choices=SOFT_WARMUPS,
        help="MaxQ's soft factor on a trained model (--init): none (paper), ramp (phased in with the ramp: the "
        "first forward is the model itself), normalize (kept mask values averaged to 1 per layer); our addition",
    )
    g.add_argument("--decay-lambda", type=float, help="SR-STE decay (default 2e-4)")
    g.add_argument(
        "--update-every",
        type=int,
        metavar="K",
        help="recompute masks every K steps (default 1; larger is faster but can cost accuracy)",
    )
    g.add_argument(
        "--calibrate",
        choices=CALIBRATION_METHODS,
        help="with --init: prune the trained model once by wanda (|W| x activation norm) or sparsegpt (OBS with "
        "weight reconstruction) from training batches, layer by layer, before training; --method oneshot then "
        "fine-tunes with that mask fixed, srste/maxq start from it",
    )
    g.add_argument(
        "--calibration-batches",
        type=int,
        metavar="K",
        help="training batches (of --batch-size, seeded by --seed, not augmented) that --calibrate reads",
    )
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--out", metavar="DIR", help="run folder (default runs/run)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (--data-dir, --device, --threads, ... may change)",
    )
    g.add_argument(
        "--extend",
        action="store_true",
        help="with --resume and a larger --epochs: train on past the run's length. The cosine lr schedule is "
        "re-laid over the new length from the current step (lr rises again), the ramp is kept, and a finished "
        "run's report.json/model_folded.pt/curves.png are kept as *.epochs-<old>.*. Without it, a different "
        "--epochs is refused",
    )
    g.add_argument(
        "--init",
        metavar="CKPT",
        help="start from these weights: a run folder, its checkpoint.pt or model_folded.pt, or a state dict saved "
        "with torch.save(model.state_dict()) of the same --model",
    )
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        help="shard the model with FSDP2 (fully_shard) instead of replicating it with DDP (under torchrun; one "
        "process works too); checkpoints are torch.distributed.checkpoint folders beside checkpoint.pt. Fixed for "
        "the run: a resumed run keeps its own",
    )
    g.add_argument("--workers", type=int, help="data-loader workers (imagefolder)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (TTY only)")
    g.add_argument("--variant", help="free-form label stored in the report (used by the study)")
    _show_defaults(p)
    p.set_defaults(func=_run_train)


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Add ``(default X)`` to each option's help from `TrainConfig` (argparse's own defaults are suppressed
    so that the options given explicitly are known)."""
    import dataclasses

    from .train.recipe import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for action in p._actions:
        value = defaults.get(action.dest, dataclasses.MISSING)
        if value in (dataclasses.MISSING, None) or "default" in (action.help or ""):
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        action.help = f"{action.help} (default {value})" if action.help else f"default {value}"


def _run_train(args: argparse.Namespace) -> int:
    from .train.data import DATASETS
    from .train.loop import train
    from .train.models import MODELS, model_names
    from .train.recipe import TrainConfig, load_yaml

    given = {k for k in vars(args) if k not in ("func", "command")}
    recipe = load_yaml(args.config) if "config" in given else {}
    options = {**recipe, **{k: v for k, v in vars(args).items() if k in given}}
    if "variant" in options:
        options["extra"] = {**options.get("extra", {}), "variant": options.pop("variant")}
    if options.get("dataset", "fashion-mnist") not in DATASETS:
        raise ValueError(f"unknown dataset {options['dataset']!r}; choose one of {sorted(DATASETS)}")
    model = options.get("model", "cnn_small")
    if model not in MODELS and model not in model_names():  # torchvision's names: import it only when asked
        raise ValueError(f"unknown model {options['model']!r}; choose one of: {', '.join(model_names()[:12])}, ...")
    cfg = TrainConfig.from_dict(options)
    if not cfg.resume:  # a resumed run's options are the checkpoint's (checked there)
        _refuse_ignored_flags(cfg, given)
        if "ramp" in recipe and "ramp" not in given and "epochs" in given:
            _refuse_recipe_ramp_that_does_not_fit(cfg, args.config)
    report = train(cfg, given | set(options) if "config" in given else given)
    if report.get("files"):
        print("\n" + "\n".join(train_summary(report)))
    return 0


#: flags of the sparsity options, and the config option each one sets (``--nm`` sets ``n`` and ``m``)
_SPARSITY_FLAGS = {
    "nm": "n",
    "ramp": "ramp",
    "schedule": "schedule",
    "per_step": "per_step",
    "tau": "tau",
    "queries": "queries",
    "order": "order",
    "soft_warmup": "soft_warmup",
    "decay_lambda": "decay_lambda",
    "update_every": "update_every",
}


def _refuse_ignored_flags(cfg: Any, given: set[str]) -> None:
    """Sparsity flags given on the command line that the run's method does not take would be ignored silently:
    refused, saying which method takes them (a recipe file may set them for every method)."""
    from .core.config import config_options

    if cfg.method == "dense":
        takes, why = set(), "a dense run has no N:M masks"
    else:
        takes = set(config_options(cfg.method))
        why = {
            "oneshot": "one-shot prunes once, from the starting weights, and keeps that mask",
            "srste": "SR-STE takes --nm, --decay-lambda and --update-every; the other sparsity options are MaxQ's",
        }.get(cfg.method, f"--method {cfg.method} does not take them")
    ignored = [name for name, option in _SPARSITY_FLAGS.items() if name in given and option not in takes]
    if cfg.method == "oneshot":  # its mask never changes: no updates to space out, no decay
        ignored += [name for name in ("update_every",) if name in given and name not in ignored]
    if ignored:
        flags = " ".join(f"--{name.replace('_', '-')}" for name in ignored)
        it = "it" if len(ignored) == 1 else "them"
        other = "" if cfg.method == "dense" else " (or use --method maxq, which takes every sparsity option)"
        raise ValueError(f"{flags} would have no effect with --method {cfg.method} ({why}): drop {it}{other}")


def _refuse_recipe_ramp_that_does_not_fit(cfg: Any, recipe: str) -> None:
    """A recipe's ramp, written for the recipe's length, that the ``--epochs`` given on the command line cannot
    finish: the blocks still dense would be pruned at the end without retraining (a model at chance). Refused
    before anything runs. A ``--ramp`` given on the command line is the user's choice, and a recipe that sets
    both is taken as written: kept, with the warning of ``maxq.train.loop``."""
    from .train.loop import ramp_left

    left, fix = ramp_left(cfg)
    if left > 0:
        start, end = cfg.method_ramp
        raise ValueError(
            f"the ramp {start:g}-{end:g} of {recipe} does not finish within this {cfg.epochs}-epoch run: {left:.0%} "
            f"of the blocks would still be dense at the end and be pruned without retraining. Pass a --ramp that "
            f"does ({fix}), or a longer --epochs"
        )


def train_summary(report: dict[str, Any]) -> list[str]:
    """The lines ``maxq train`` prints at the end, from its ``report.json``. The headline accuracy is the shipped
    (folded) model's; the last epoch's is given beside it when folding changed it."""
    dense_run = report["method"] == "dense"
    what = "dense" if dense_run else f"{report['method']} {report['n']}:{report['m']}"
    top1, last = report["top1_folded"], report["top1_last"]
    head = f"maxq train: {what} {report['model']} on {report['dataset']}: top-1 {top1:.2f}% (shipped folded model"
    if last is not None and abs(top1 - last) > 1e-9:
        head += f"; last epoch before folding {last:.2f}%"
    head += ")"
    if report.get("top1_best") is not None:
        head += f", best epoch {report['top1_best']:.2f}% (epoch {report['best_epoch']})"
    lines = [head]
    if not report.get("ramp_finished", True):
        lines.append(
            "  ramp unfinished at the end: the blocks still dense were pruned when folding "
            "(train longer or end the ramp earlier)"
        )
    total, nonzero = report["params_total"], report["params_nonzero"]
    share = f"{nonzero:,} of {total:,} parameters nonzero ({nonzero / max(total, 1):.1%})"
    if dense_run:
        lines.append(f"  layers: none sparsified (dense run); {share}")
    else:
        lines.append(
            f"  layers: {report['layers_sparsified']} of {report['layers_total']} sparsified "
            f"{report['n']}:{report['m']}; {share}"
        )
        dense = report.get("dense_layers") or []
        if dense:
            named = "; ".join(
                f"layer {d['layer']} ({d['type'] + ': ' if d.get('type') else ''}{d['reason']})" for d in dense
            )
            lines.append(f"  dense:  {named}")
        verdict = "yes" if report["nm_ok"] else "NO"
        lines.append(f"  N:M compliant (the {report['layers_sparsified']} sparsified layers): {verdict}")
    lines.append(f"  time:   {report['train_time_s']:.0f} s of training")
    files = report["files"]
    lines += [f"  report: {files['report']}", f"  plot:   {files['plot']}", f"  model:  {files['folded']}"]
    return lines


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="fold, verify and write deployable artifacts",
        description="Fold the masks of a run (folder, checkpoint.pt, model_folded.pt or compressed file), optionally "
        "fold BatchNorm, verify N:M compliance, and write the requested artifacts. Nothing is written unless the "
        "model verifies, and existing files are not replaced unless --overwrite.",
    )
    p.add_argument("source", metavar="RUN_OR_CKPT")
    p.add_argument("--bn-fold", action="store_true", help="fold BatchNorm into the preceding convs (pattern kept)")
    p.add_argument("--onnx", metavar="PATH", help="write FP32 ONNX and check it against PyTorch with onnxruntime")
    p.add_argument("--fp16", metavar="PATH", help="write FP16 ONNX (fp32 inputs/outputs; what TensorRT builds from)")
    p.add_argument(
        "--int8",
        metavar="PATH",
        help="write INT8 ONNX (QDQ; static post-training quantization calibrated on training images)",
    )
    from .deploy.quantize import DEFAULT_CALIB_SAMPLES

    calib_help = f"training images that calibrate --int8 (default {DEFAULT_CALIB_SAMPLES})"
    p.add_argument("--calib-samples", type=int, metavar="N", help=calib_help)
    p.add_argument("--dataset", help="dataset of the --int8 calibration images (default: the one the run records)")
    p.add_argument("--data-dir", metavar="DIR", help="its folder (Fashion-MNIST default: Debian's package)")
    p.add_argument("--compressed", metavar="PATH", help="write the compressed N:M file (values + packed indices)")
    p.add_argument("--folded", metavar="PATH", help="write the folded PyTorch model file")
    p.add_argument(
        "--force",
        action="store_true",
        help="fold a checkpoint whose ramp is unfinished (prunes now); it does not replace files: see --overwrite",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace output files that exist (default: refuse, before writing)"
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="the export summary as JSON: --json alone (as for verify and eval) prints it to stdout, the other "
        "lines going to stderr; --json PATH writes it to a file",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import json

    from .deploy.artifacts import model_from
    from .deploy.export import check_outputs, export_model

    outputs = (args.folded, args.compressed, args.onnx, args.fp16, args.int8)
    if not any(outputs):
        raise ValueError("nothing to write: pass --onnx, --fp16, --int8, --compressed and/or --folded")
    check_outputs(
        (*outputs, None if args.json == "-" else args.json), args.overwrite
    )  # before reading or writing anything
    model, arch = model_from(args.source, force=args.force)
    result = export_model(
        model,
        arch,
        source=args.source,
        bn_fold=args.bn_fold,
        folded=args.folded,
        compressed=args.compressed,
        onnx=args.onnx,
        fp16=args.fp16,
        int8=args.int8,
        calib_samples=args.calib_samples,
        dataset=args.dataset,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
    )
    summary = result.summary
    to_stdout = args.json == "-"  # the JSON is the result then: the lines below go to stderr

    def say(*parts: Any) -> None:
        print(*parts, file=sys.stderr if to_stdout else sys.stdout)

    if args.bn_fold:
        say(f"folded {len(summary['bn_folded'])} BatchNorm layer(s) into their convs")
    if summary.get("dense"):
        say(f"{args.source}: a dense run, no N:M layers to verify; its files are the dense baseline's")
    else:
        say(result.check)
    if args.folded and "folded" in summary:
        say(f"folded model: {args.folded}")
    if "compressed" in summary:
        c, dense = summary["compressed"], summary["dense_file_bytes"]
        say(
            f"compressed: {args.compressed}: {c['file_bytes']:,} bytes vs {dense:,} dense "
            f"({c['file_bytes'] / dense:.1%}); sparse layers {c['sparse_bytes']:,} bytes, "
            f"{c['sparse_over_bound']:+.2%} vs the bound {c['sparse_bound_bytes']:,.0f}; restores bit-exactly"
        )
    dense = bool(summary.get("dense"))

    def nm(o: dict[str, Any], count: int, kind: str = "") -> str:
        if dense:
            return "dense model (no N:M layers)"
        return f"{count} N:M {kind}initializers, verify {'OK' if o['nm_ok'] else 'FAILED'}"

    if "onnx" in summary:
        o = summary["onnx"]
        say(f"onnx: {args.onnx}: max |onnxruntime - torch| / output scale {max(o['max_abs_diff'].values()):.2e} "
            f"over batch sizes {sorted(o['max_abs_diff'])}; {nm(o, o['sparse_initializers'])}")  # fmt: skip
    if "fp16" in summary:
        o = summary["fp16"]
        say(f"fp16: {args.fp16}: max |onnxruntime - torch| / output scale {max(o['max_abs_diff'].values()):.2e}; "
            f"{nm(o, o['sparse_initializers'])}")  # fmt: skip
    if "int8" in summary:
        o = summary["int8"]
        agree = (
            f"; top-1 agrees with FP32 on {o['top1_agreement_with_fp32']:.1%} of {o['agreement_samples']} "
            f"held-out training images"
            if "top1_agreement_with_fp32" in o
            else ""
        )
        pruned, kept = ("", "") if dense else ("pruned weights all 0, ", "kept ")
        say(f"int8: {args.int8}: calibrated on {o['calibration']['samples']} {o['calibration']['dataset']} training "
            f"images; {pruned}{o['kept_rounded_to_zero']} of {o['kept_total']:,} {kept}weights rounded to 0; "
            f"{nm(o, len(o['sparse_initializers']), 'int8 ')}{agree}")  # fmt: skip
    if to_stdout:
        print(json.dumps(summary, indent=2))
    elif args.json:
        from .train.checkpoint import atomic_write_bytes

        atomic_write_bytes((json.dumps(summary, indent=2) + "\n").encode(), args.json)
    if not result.ok:
        print(f"maxq export: {result.problem}", file=sys.stderr)
        return 1
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="N:M compliance report of a checkpoint, state dict, compressed, ONNX, safetensors, Hugging Face "
        "or Lightning file",
        description="FILE: a maxq run folder, checkpoint, folded or compressed file, ONNX file, torch state dict, "
        ".safetensors file, Hugging Face model folder (config.json + model.safetensors, shards, or "
        "pytorch_model.bin) or Lightning .ckpt; torch files are read with weights_only=True (files that would run "
        "code are refused). Which layers must be N:M: --layers if given, else the file's maxq layout record, else "
        "(with --nm) every layer not found dense: without a record a layer must be N:M or dense (at most 1% of "
        "its nonzero blocks N:M), and one that is neither fails. Weights stored [in, out] (Hugging Face Conv1D: "
        "GPT-2 family) are checked along dim 0: as the layout record says, for Hugging Face folders of model_type "
        "gpt2 / openai-gpt / imagegpt / decision_transformer their c_attn, q_attn, c_fc and c_proj, or as "
        "--transposed says. Exit code 0 only when at least one layer must be N:M and every one that must is "
        "(1: violations, or a dense run; 2: unreadable, corrupt or unsafe input, or a missing --nm).",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--nm", type=_nm, metavar="N:M", help="the pattern, for files that do not record it")
    p.add_argument(
        "--layers",
        metavar="REGEX",
        help="the layers that must be N:M: every 2-D/4-D weight whose layer name matches (Python re.search), "
        "e.g. 'encoder\\..*(query|key|value|dense)$'; replaces the file's layout record",
    )
    p.add_argument(
        "--transposed",
        metavar="REGEX",
        help="2-D weights stored [in, out] (Hugging Face Conv1D) whose layer name matches: checked along dim 0 "
        "(replaces what the file or its model_type says); e.g. '(c_attn|c_fc|c_proj)$'",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    import json

    from .deploy.verify import DENSE_NOTE, verify_file

    check, kind, note = verify_file(args.file, args.nm, layers=args.layers, transposed=args.transposed)
    if note == DENSE_NOTE:  # nothing in the file is N:M: say so, exit 1 (not an N:M model)
        if args.json:
            print(json.dumps({"file": args.file, "kind": kind, "note": note, "dense": True, "ok": False, "layers": []}))
        else:
            print(f"{args.file} ({kind}): {note}")
        return 1
    if args.json:
        print(json.dumps({"file": args.file, "kind": kind, "note": note, **check.to_dict()}, indent=2))
    else:
        print(f"{args.file} ({kind}{'; ' + note if note else ''})")
        print(check)
    return 0 if check.ok else 1


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="test-set top-1 / top-5 of any artifact (run folder, checkpoint, folded, compressed, ONNX)",
        description="Evaluate a file maxq wrote on its dataset's test split: PyTorch files on CPU, ONNX files (FP32, "
        "FP16, INT8) with onnxruntime on CPU. Exit code 2 if the file is unreadable or corrupt.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--dataset", help="default: the dataset the file records")
    p.add_argument("--data-dir", metavar="DIR", help="dataset folder (Fashion-MNIST default: Debian's package)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from .deploy.evaluate import evaluate_file

    if args.threads:
        torch.set_num_threads(args.threads)
    r = evaluate_file(args.file, args.dataset, args.data_dir, batch_size=args.batch_size, threads=args.threads)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        print(f"{r.file} ({r.kind}, {r.precision}): top-1 {r.top1:.2f}%, top-5 {r.top5:.2f}%, loss {r.loss:.4f} "
              f"on the {r.dataset} test split ({r.samples:,} images, {r.seconds:.1f} s)")  # fmt: skip
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``maxq train: error: ... (maxq train --help lists the options)``, exit 2;
    the usage block is for ``--help``, not for a mistyped value."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maxq", description="N:M sparse training with MaxQ and its baselines.")
    parser.add_argument("--version", action="version", version=f"maxq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_export(sub)
    _add_verify(sub)
    _add_eval(sub)
    for command in sub.choices.values():  # -v also after the command (maxq train ... -v)
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging and tracebacks"
        )
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log_to_stderr(verbose: bool) -> logging.Handler:
    """maxq's log lines go to stderr (results -- tables, JSON -- to stdout); other libraries' INFO lines (matplotlib,
    onnxruntime's quantizer) are not shown. Returns the handler, which `main` removes when it ends."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if os.environ.get("RANK", "0") != "0":  # torchrun: the main process speaks; the others only of errors
        handler.addFilter(lambda record: record.levelno >= logging.ERROR)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the message names it (maxq eval: error: ...)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    verbose = args.__dict__.pop("verbose", False)
    handler = _log_to_stderr(verbose)
    try:
        return _run(args, verbose)
    finally:
        log.removeHandler(handler)


def _run(args: argparse.Namespace, verbose: bool) -> int:
    """The subcommand, with every failure turned into one line on stderr and an exit code."""
    func: Callable[[argparse.Namespace], int] = args.func
    from .train.checkpoint import CheckpointError
    from .train.data import DatasetMissing
    from .train.loop import TrainingInterrupted

    try:
        return func(args)
    except (ValueError, DatasetMissing, CheckpointError) as exc:  # CompressedError is a ValueError
        if verbose:
            traceback.print_exc()
        print(f"maxq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted:
        return 130  # the loop logged where the checkpoint is and the command that resumes
    except KeyboardInterrupt:
        print(f"maxq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: one line, the traceback on request
        if verbose:
            traceback.print_exc()
            print(f"maxq {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"maxq {args.command}: error: {_one_line(exc)} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
