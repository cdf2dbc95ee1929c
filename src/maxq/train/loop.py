"""The training loop behind ``maxq train``: one function, :func:`train`, readable top to bottom.

setup (processes, device, seeds) -> safety checks (resume / init, before anything is written) -> data -> model
-> sparsifier -> optimizer and schedule -> restore -> epochs (train, evaluate, log, checkpoint) -> fold, verify,
report, plot.

One process or several (``torchrun``): DDP with gloo on CPU and NCCL on CUDA; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from .. import __version__
from ..core.check import check_nm
from ..core.fold import fold_, nm_layout
from ..core.sparsifier import Sparsifier, sparsify_
from .checkpoint import CHECKPOINT_FORMAT, FOLDED_FORMAT, CheckpointError, atomic_save, folded_file, load_checkpoint
from .data import DataInfo, augment, load_dataset, normalize
from .models import build_model
from .recipe import AMP_DTYPES, RESUMABLE_OVERRIDES, TrainConfig

__all__ = ["train", "RunExists", "lr_factor"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class RunExists(ValueError):
    """The output folder already holds a run and ``--resume`` was not given."""


# -- processes and devices ------------------------------------------------------------------------------------


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _setup_processes(cfg: TrainConfig) -> tuple[Processes, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    procs = Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
    if want_cuda:
        index = procs.local_rank if procs.distributed or cfg.device == "auto" else torch.device(cfg.device).index or 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if procs.distributed and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return procs, device


# -- schedules and optimizer ----------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``: linear warmup over ``warmup``
    steps, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    if not cfg.no_decay_1d:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- data -----------------------------------------------------------------------------------------------------


def _loader(ds: Dataset, cfg: TrainConfig, procs: Processes, *, train: bool, in_memory: bool) -> DataLoader:
    if train:
        sampler = DistributedSampler(ds, procs.world, procs.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        return DataLoader(
            ds, cfg.batch_size, sampler=sampler, drop_last=True, num_workers=0 if in_memory else cfg.workers
        )
    # Evaluation: a plain rank-strided shard (no padding duplicates), so the summed counts are exact.
    shard = Subset(ds, range(procs.rank, len(ds), procs.world))
    return DataLoader(shard, max(cfg.batch_size, 256), shuffle=False, num_workers=0 if in_memory else cfg.workers)


def _prepare(x: torch.Tensor, info: DataInfo, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if not info.in_memory:
        return x  # already transformed by the dataset
    if gen is not None:
        x = augment(x, info, gen)
    return normalize(x, info)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, info: DataInfo, device: torch.device, procs: Processes
) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the loader, summed over all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for x, y in loader:
        x, y = _prepare(x, info, device, None), y.to(device)
        logits = model(x).float()
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[1] += (top[:, 0] == y).sum()
        totals[2] += (top == y[:, None]).any(dim=1).sum()
        totals[3] += y.numel()
    if procs.distributed:
        torch_dist.all_reduce(totals)
    count = max(float(totals[3]), 1.0)
    return {
        "loss": float(totals[0]) / count,
        "top1": 100 * float(totals[1]) / count,
        "top5": 100 * float(totals[2]) / count,
    }


# -- checkpoints ----------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """Every RNG's state, as plain data (``torch.load(weights_only=True)`` reads it back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }  # fmt: skip


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        saved = (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["gauss"])
    np.random.set_state(saved)  # checkpoints of older maxq hold numpy's own tuple


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, given: set[str], path: Path) -> TrainConfig:
    """The run configuration to resume with: the checkpoint's, with the allowed overrides applied. Options
    given on this command line that contradict the checkpoint are an error."""
    merged = dict(saved["config"])
    asked = cfg.to_dict()
    conflicts = sorted(k for k in given - RESUMABLE_OVERRIDES if k in asked and asked[k] != merged.get(k))
    if conflicts:
        details = ", ".join(f"{k}: checkpoint {merged.get(k)!r} vs asked {asked[k]!r}" for k in conflicts)
        raise CheckpointError(
            f"{path} was trained with other settings ({details}); drop those flags or use another --out"
        )
    for key in RESUMABLE_OVERRIDES & given:
        merged[key] = asked[key]
    merged["resume"] = True
    resumed = TrainConfig.from_dict(merged)
    if saved["epoch"] > resumed.epochs:
        raise CheckpointError(f"{path} is at epoch {saved['epoch']}, past --epochs {resumed.epochs}")
    return resumed


def _init_weights(model: nn.Module, path: str) -> None:
    """Start from another run's weights: a ``maxq train`` checkpoint of a dense run, or a folded model."""
    p = Path(path)
    try:
        state = load_checkpoint(p)
        weights = state["model"]
    except CheckpointError:
        weights = load_checkpoint(p, kind=FOLDED_FORMAT)["state_dict"]
    if any(".parametrizations." in k for k in weights):
        raise CheckpointError(f"--init {p}: this checkpoint still holds masks; use its run's model_folded.pt")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--init {p} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")


# -- the run --------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    given: set[str] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any], Sparsifier | None], None] | None = None,
) -> dict[str, Any]:
    """Train per ``cfg`` and return the final report (also written to ``<out>/report.json``).

    Args:
        cfg: the resolved configuration.
        given: option names set explicitly by the user (checked against a checkpoint on ``--resume``).
        on_epoch_end: called as ``fn(epoch, metrics, sparsifier)`` after each epoch's checkpoint is written, on
            every rank.
    """
    given = given or set()
    procs, device = _setup_processes(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)

    # Safety checks first: nothing in `out` changes unless the run can actually start.
    saved = None
    if cfg.resume:
        saved = load_checkpoint(out / CHECKPOINT)
        cfg = _check_resume(saved, cfg, given, out / CHECKPOINT)
    elif (out / CHECKPOINT).exists() or (out / "report.json").exists():
        raise RunExists(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if cfg.method == "maxq":
        end = cfg.resolved_ramp[1]
        last = cfg.epochs - (0.0 if cfg.per_step else 1.0)
        if end > last:
            log.warning(
                "the ramp ends at epoch %g but the run stops before it (%d epochs%s): the remaining dense blocks "
                "are pruned at the end. Use a shorter --ramp or --per-step.",
                end,
                cfg.epochs,
                "" if cfg.per_step else ", staircase",
            )
    if cfg.init and not Path(cfg.init).is_file():
        raise CheckpointError(f"--init {cfg.init} does not exist")
    amp = (device.type == "cuda") if cfg.amp is None else cfg.amp
    if amp and device.type != "cuda":
        raise ValueError("--amp needs a CUDA device")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # Data
    splits = load_dataset(
        cfg.dataset, cfg.data_dir, val_split=cfg.val_split, subset=cfg.subset, image_size=cfg.image_size
    )
    info = splits.info
    train_loader = _loader(splits.train, cfg, procs, train=True, in_memory=info.in_memory)
    test_loader = _loader(splits.test, cfg, procs, train=False, in_memory=info.in_memory)
    val_loader = (
        _loader(splits.val, cfg, procs, train=False, in_memory=info.in_memory) if splits.val is not None else None
    )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(splits.train)} samples)")

    # Model and sparsifier
    model = build_model(cfg.model, info.channels, info.classes, info.image_size)
    if cfg.init:
        _init_weights(model, cfg.init)
    elif cfg.method == "oneshot" and not saved:
        log.warning("oneshot without --init prunes the random initialization; pass --init DENSE_RUN/checkpoint.pt")
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    sparse_cfg = cfg.sparsity_config()
    sparsifier: Sparsifier | None = sparsify_(model, sparse_cfg) if sparse_cfg is not None else None
    net: nn.Module = model
    if procs.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the training forward only: W * mask needs no graph break; masks change outside it
        net = torch.compile(net)

    # Optimizer and schedule (per optimizer step)
    optimizer = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    total_steps, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))
    amp_dtype = getattr(torch, AMP_DTYPES[cfg.amp_dtype])
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)  # bf16 needs no scaling
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            if sparsifier is not None:
                sparsifier.load_state_dict(saved["sparsifier"])
            _set_rng_state(saved["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{out / CHECKPOINT} does not match this run: {exc}") from None
        history, start_epoch = list(saved["history"]), int(saved["epoch"])
        log.info("resuming %s at epoch %d of %d", out, start_epoch, cfg.epochs)

    arch = {
        "model": cfg.model,
        "in_channels": info.channels,
        "num_classes": info.classes,
        "image_size": info.image_size,
        "dataset": cfg.dataset,
    }
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(_yaml(cfg.to_dict()))
        with open(out / "metrics.jsonl", "w") as f:  # rewritten from the checkpoint's history on resume
            f.writelines(json.dumps(h) + "\n" for h in history)
    log.info(
        "%s %s on %s/%s: %d epochs x %d steps, device %s, %d process(es)",
        cfg.method,
        cfg.nm,
        cfg.dataset,
        cfg.model,
        cfg.epochs,
        steps_per_epoch,
        device,
        procs.world,
    )

    started = time.time()
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.time()
        p = sparsifier.set_progress(epoch) if sparsifier is not None else 0.0
        train_loader.sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + procs.rank)
        net.train()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (procs.main and cfg.progress and sys.stderr.isatty()),
        )
        for i, (x, y) in enumerate(bar):
            x, y = _prepare(x, info, device, gen), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = net(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # SR-STE decay is defined on true gradients
            if sparsifier is not None:
                sparsifier.regularize_()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if sparsifier is not None:  # masks for the next step, from the updated weights
                sparsifier.step(epoch + (i + 1) / steps_per_epoch if cfg.per_step else None)
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            if i % 20 == 0 and not bar.disable:  # .item() waits for the device: only when someone watches
                now = sparsifier.dense_fraction if sparsifier is not None else 0.0
                bar.set_postfix(loss=f"{loss.item():.3f}", p=f"{now:.2f}")

        stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]).double()
        if procs.distributed:
            torch_dist.all_reduce(stats)
        test = evaluate(model, test_loader, info, device, procs)
        val = evaluate(model, val_loader, info, device, procs) if val_loader is not None else None
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(stats[0] / stats[2]),
            "train_top1": 100 * float(stats[1] / stats[2]),
            "test_loss": test["loss"],
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "lr": optimizer.param_groups[0]["lr"],
            "dense_fraction": p,  # at the epoch's start
            "epoch_time_s": time.time() - epoch_start,
            "elapsed_s": elapsed_before + time.time() - started,
        }
        if val is not None:
            record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        if sparsifier is not None:
            sparse_rows = sparsifier.report().sparsified
            record["dense_block_fraction"] = float(np.mean([r.dense_block_fraction for r in sparse_rows]))
        history.append(record)
        if procs.main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "maxq_version": __version__,
                "config": cfg.to_dict(),
                "arch": arch,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
                "rng": _rng_state(),
                "history": history,
            }
            atomic_save(state, out / CHECKPOINT)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            extra = f" val {val['top1']:.2f}%" if val is not None else ""
            log.info(
                "epoch %d/%d  loss %.4f  test top-1 %.2f%%%s  p %.2f  %.0fs",
                epoch + 1, cfg.epochs, record["train_loss"], test["top1"], extra, p, record["epoch_time_s"],
            )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record, sparsifier)

    report = _finish(cfg, model, sparsifier, history, test_loader, info, device, procs, out, arch)
    if procs.distributed:
        torch_dist.barrier()
    return report


def _finish(
    cfg: TrainConfig,
    model: nn.Module,
    sparsifier: Sparsifier | None,
    history: list[dict[str, Any]],
    test_loader: DataLoader,
    info: DataInfo,
    device: torch.device,
    procs: Processes,
    out: Path,
    arch: dict[str, Any],
) -> dict[str, Any]:
    """Fold, verify, evaluate the folded model, and write report.json, model_folded.pt and the plot."""
    n, m = cfg.n_m
    ramp_finished = sparsifier is None or sparsifier.ramp_finished
    layout = None
    if sparsifier is not None:
        skipped = [{"layer": c.name, "reason": c.reason} for c in sparsifier.choices if not c.selected]
        fold_(model, force=not ramp_finished)  # an unfinished ramp is pruned to N:M now (logged)
        layout = nm_layout(model)
        nm_ok = check_nm(model, n, m).ok
    else:
        skipped, nm_ok = [], None
    folded = evaluate(model, test_loader, info, device, procs)
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    tops = [h["test_top1"] for h in history]
    best = int(np.argmax(tops)) if tops else 0
    report: dict[str, Any] = {
        "method": cfg.method,
        "n": n,
        "m": m,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "top1_last": tops[-1] if tops else None,
        "top1_best": tops[best] if tops else None,
        "best_epoch": best + 1 if tops else None,
        "top5_last": history[-1]["test_top5"] if history else None,
        "top1_folded": folded["top1"],
        "nm_ok": nm_ok,
        "ramp": list(cfg.resolved_ramp) if cfg.method == "maxq" else None,
        "ramp_finished": ramp_finished,
        "params_total": total,
        "params_nonzero": nonzero,
        "sparse_layers": list(layout.layers) if layout else [],
        "dense_layers": skipped,
        "train_time_s": history[-1]["elapsed_s"] if history else 0.0,
        "variant": cfg.extra.get("variant"),
        "maxq_version": __version__,
    }
    if history and "val_top1" in history[-1]:
        vals = [h["val_top1"] for h in history]
        report.update(val_top1_last=vals[-1], val_top1_best=max(vals))
    if procs.main:
        atomic_save(folded_file(model.state_dict(), layout, arch, cfg.to_dict()), out / "model_folded.pt")
        from .plots import plot_run

        plot_run(history, cfg, out / "curves.png")
        names = {"report": "report.json", "checkpoint": CHECKPOINT, "folded": "model_folded.pt"}
        names.update(metrics="metrics.jsonl", plot="curves.png", config="config.yaml")
        report["files"] = {k: str(out / v) for k, v in names.items()}
        tmp = out / ".report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out / "report.json")
    return report


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
