"""The training loop behind ``maxq train``: one function, `train`, readable top to bottom.

setup (processes, device, seeds) -> safety checks (resume / init, before anything is written) -> data -> model
-> sparsifier -> optimizer and schedule -> restore -> epochs (train, evaluate, log, checkpoint) -> fold, verify,
report, plot.

One process or several (``torchrun``): DDP with gloo on CPU and NCCL on CUDA, or with ``--fsdp`` the model sharded
by FSDP2 (``fully_shard``, see `maxq.train.fsdp`) and checkpointed by ``torch.distributed.checkpoint``; only rank 0
writes files (each process writes its shards of a sharded checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from tqdm import tqdm

from .. import __version__
from ..calibrate import calibrate_, calibration_for
from ..core.check import check_nm
from ..core.fold import fold_, nm_layout
from ..core.sparsifier import Sparsifier, sparsify_
from ..core.stepping import OptimizerSteps
from .checkpoint import (
    CHECKPOINT_FORMAT,
    SHARDED_FORMAT,
    CheckpointError,
    atomic_save,
    folded_file,
    load_checkpoint,
    load_init_,
    load_sharded,
    read_init,
    save_sharded,
)
from .data import DataInfo, augment, load_dataset, normalize
from .fsdp import broadcast_buffers, equal_batch_count, full_model_state, shard_blocks
from .metrics import batch_counts, from_counts
from .models import build_model
from .recipe import AMP_DTYPES, RESUMABLE_OVERRIDES, TrainConfig

__all__ = ["train", "RunExists", "TrainingInterrupted", "lr_factor", "ramp_left", "resume_command"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


#: the final artifacts of a run; an extended run keeps the earlier ones as ``<stem>.epochs-<E><suffix>``.
FINAL_FILES = ("report.json", "model_folded.pt", "curves.png")


class RunExists(ValueError):
    """The output folder already holds a run and ``--resume`` was not given (or the run has finished)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped `train`. The folder is left resumable from its last checkpoint.

    Attributes:
        out: the run folder.
        checkpoint: the last checkpoint written (``None`` if the first epoch never finished).
        epochs_done: epochs the checkpoint holds (0 without one).
        epochs: the run's planned length.
        command: the exact command that continues the run (``None`` without a checkpoint).
    """

    def __init__(self, out: Path, checkpoint: Path | None, epochs_done: int, epochs: int) -> None:
        self.out, self.checkpoint, self.epochs_done, self.epochs = out, checkpoint, epochs_done, epochs
        self.command = resume_command(out) if checkpoint is not None else None
        if checkpoint is not None:
            where = f"in epoch {epochs_done + 1} of {epochs}" if epochs_done < epochs else "while writing the results"
            message = (
                f"interrupted {where}. The last checkpoint is {checkpoint} (after epoch {epochs_done}); "
                f"the folder is resumable: {self.command}"
            )
        else:
            message = (
                f"interrupted in epoch 1 of {epochs}, before the first checkpoint: there is nothing to resume; "
                f"run the same command again to start over"
            )
        super().__init__(message)


def resume_command(out: str | Path) -> str:
    """The command line that continues the run in ``out``."""
    return f"maxq train --out {shlex.quote(str(out))} --resume"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, schedulers, torchrun stopping its workers) into ``KeyboardInterrupt`` meanwhile,
    so a terminated run ends the same way as Ctrl-C. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- processes and devices ------------------------------------------------------------------------------------


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # --fsdp: the model is sharded (every forward is a collective)
    own_group: bool = False  # the process group is ours to close (--fsdp in one process)

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


def _setup_sharding(procs: Processes, device: torch.device) -> None:
    """``--fsdp`` (known once a resumed run's configuration is read): ``fully_shard`` and DCP need a process group,
    so one process gets a group of one, closed when `train` ends."""
    procs.sharded = True
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
        procs.own_group = True


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
        totals += batch_counts(model(x), y)
    if procs.sharded:  # a sharded forward is a collective: as many on every process, the extra ones not counted
        shard = loader.dataset
        whole = shard.dataset if isinstance(shard, Subset) else shard
        x, _ = default_collate([whole[0]])
        for _ in range(equal_batch_count(len(loader), device) - len(loader)):
            model(_prepare(x, info, device, None))
    if procs.distributed:
        torch_dist.all_reduce(totals)
    return from_counts(totals)


def _evaluate_before(
    model: nn.Module,
    test_loader: DataLoader,
    val_loader: DataLoader | None,
    info: DataInfo,
    device: torch.device,
    procs: Processes,
) -> dict[str, float]:
    """Test (and held-out val) loss and top-1 of the model as it stands, in eval mode: with ``--init``, the
    sparsified starting model before any fine-tuning step (changes no weights, masks, statistics or RNG)."""
    test = evaluate(model, test_loader, info, device, procs)
    result = {"test_loss": test["loss"], "test_top1": test["top1"]}
    if val_loader is not None:
        val = evaluate(model, val_loader, info, device, procs)
        result.update(val_loss=val["loss"], val_top1=val["top1"])
    return result


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
    given on this command line that contradict the checkpoint are an error, and so is a different ``--epochs``
    unless it is larger and ``--extend`` is given (the schedule was laid out for the old length)."""
    merged = dict(saved["config"])
    asked = cfg.to_dict()
    conflicts = sorted(k for k in given - RESUMABLE_OVERRIDES if k in asked and asked[k] != merged.get(k))
    if conflicts:
        details = ", ".join(f"{k}: checkpoint {merged.get(k)!r} vs asked {asked[k]!r}" for k in conflicts)
        raise CheckpointError(
            f"{path} was trained with other settings ({details}); drop those flags or use another --out"
        )
    old_epochs, done = int(merged["epochs"]), int(saved["epoch"])
    new_epochs = cfg.epochs if "epochs" in given else old_epochs
    out = path.parent
    if new_epochs != old_epochs:
        ramp = merged.get("ramp")  # pinned since issue 20 (the ramp followed); None in older checkpoints
        schedule = "its cosine learning-rate schedule" + (
            (f" and its ramp {ramp[0]:g}-{ramp[1]:g}" if ramp else " and its default ramp")
            if merged.get("method") == "maxq"
            else ""
        )
        if new_epochs < max(done, old_epochs):
            raise CheckpointError(
                f"{path} is a {old_epochs}-epoch run ({done} done): {schedule} were laid out for that length and "
                f"cannot be shortened; resume without --epochs"
            )
        if not cfg.extend:
            raise CheckpointError(
                f"{path} is a {old_epochs}-epoch run ({done} done) and {schedule} were laid out for that length. "
                f"To train it to {new_epochs} epochs add --extend: the cosine schedule is then re-laid over "
                f"{new_epochs} epochs from the current step on (the learning rate goes up again), the ramp is kept, "
                f"and a finished run's final files are kept as *.epochs-{old_epochs}.* beside the new ones"
            )
    elif cfg.extend:
        raise CheckpointError(f"--extend needs an --epochs larger than the run's {old_epochs}")
    elif done >= old_epochs and (out / "report.json").exists():
        raise RunExists(
            f"{out} holds a finished {old_epochs}-epoch run (report: {out / 'report.json'}); to train it longer, "
            f"{resume_command(out)} --epochs N --extend (N > {old_epochs})"
        )
    if new_epochs != old_epochs and merged.get("method") == "maxq" and merged.get("ramp") is None:
        # Pin the default ramp (a share of --epochs) to the one the run was trained with.
        merged["ramp"] = list(TrainConfig.from_dict({**merged, "resume": True}).resolved_ramp)
    for key in RESUMABLE_OVERRIDES & given:
        merged[key] = asked[key]
    merged["epochs"] = new_epochs
    merged["extend"] = new_epochs != old_epochs
    merged["resume"] = True
    return TrainConfig.from_dict(merged)


def _keep_final_files(out: Path, epochs: int) -> list[Path]:
    """Rename the final files of a finished ``epochs``-epoch run out of the way of an extension's new ones."""
    moves = [(out / name, out / f"{Path(name).stem}.epochs-{epochs}{Path(name).suffix}") for name in FINAL_FILES]
    moves = [(a, b) for a, b in moves if a.exists()]
    taken = [str(b) for _, b in moves if b.exists()]
    if taken:
        raise RunExists(f"cannot keep the {epochs}-epoch run's final files: {', '.join(taken)} already exist")
    for a, b in moves:
        os.replace(a, b)
    return [b for _, b in moves]


def _fit_ramp(cfg: TrainConfig, given: set[str], say: bool) -> TrainConfig:
    """The ramp this run follows, pinned in the config (so config.yaml, checkpoints and report.json record it).

    The ramp must end while the run still trains, or the blocks still dense at the end are pruned without
    retraining. With the default per-epoch staircase ``p`` moves at epoch starts only, so the last change that
    trains is at the start of the last epoch; a per-step ramp moves every step, up to the run's end.

    * The default ramp (the first 25% of the run) always ends within the run, but not always at a staircase
      step: for a run shorter than its ramp's staircase (a 1-epoch run: ``p`` would stay 1 through the only
      epoch), it is ramped per step over the same epochs instead, and that is logged.
    * A ramp the user set (``--ramp`` or the recipe, or ``--no-per-step`` given with the default ramp) is kept;
      if it does not finish, a warning says how many blocks are still dense at the end (pruned when folding) and
      how to make it fit.
    """
    if cfg.method_ramp is None:
        return cfg
    start, end = cfg.method_ramp
    left, fix = ramp_left(cfg)
    if left == 0:
        return dataclasses.replace(cfg, ramp=(start, end))
    if cfg.ramp is None and "per_step" not in given:
        if say:
            log.warning(
                "the ramp %g-%g (epochs; default: the first 25%% of the run) does not fit a %s with a per-epoch "
                "staircase (the blocks would stay dense for the whole run and be pruned at the end): ramping per "
                "step over epochs %g-%g instead",
                start, end, f"{cfg.epochs}-epoch run", start, end,
            )  # fmt: skip
        return dataclasses.replace(cfg, ramp=(start, end), per_step=True)
    if say:
        staircase = "" if cfg.per_step else " (per-epoch staircase: the ramp moves at epoch starts only)"
        log.warning(
            "the ramp %g-%g does not finish within this %s%s: %.0f%% of the blocks are still dense at the end "
            "and get pruned when folding, without retraining, which costs accuracy. To finish it in training, %s "
            "(or drop --ramp: the default ramps over the first 25%% of the run)",
            start, end, f"{cfg.epochs}-epoch run", staircase, 100 * left, fix,
        )  # fmt: skip
    return dataclasses.replace(cfg, ramp=(start, end))


def ramp_left(cfg: TrainConfig) -> tuple[float, str]:
    """The share of blocks the run's ramp leaves dense at its end (0: it finishes in training), and how to make it
    finish: with a per-step ramp the last progress that trains is ``epochs``, with the per-epoch staircase the
    start of the last epoch, ``epochs - 1``."""
    if cfg.method_ramp is None:
        return 0.0, ""
    start, _ = cfg.method_ramp
    last = cfg.epochs if cfg.per_step else cfg.epochs - 1  # the last progress value that still trains
    left = cfg.sparsity_config().dense_fraction(last)
    if cfg.per_step:
        half = cfg.epochs / 2
        fix = (
            f"end it by epoch {cfg.epochs:g}: e.g. --ramp {min(start, half):g} {half:g} (the first half of the run, "
            "which leaves the second half to recover at the final pattern)"
        )
    else:
        fix = f"end it by epoch {cfg.epochs - 1:g}, or add --per-step to ramp every step up to epoch {cfg.epochs:g}"
    return left, fix


def _epochs(count: float) -> str:
    """``1 epoch``, ``3 epochs``, ``0.5 epochs``."""
    return f"{count:g} epoch" + ("" if count == 1 else "s")


def _check_out(out: Path) -> None:
    """``out`` must be (or become) a writable folder: fail before anything is loaded or written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder for the run (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, so the run folder cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def _preflight(
    model: nn.Module, ds: Dataset, info: DataInfo, device: torch.device, criterion: nn.Module, cfg: TrainConfig
) -> None:
    """One no-grad eval forward and loss on two test samples, so a model that does not fit the data fails here,
    before anything is written. Touches no weights, masks, BatchNorm statistics or random state."""
    x, y = default_collate([ds[i] for i in range(min(2, len(ds)))])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            criterion(model(_prepare(x, info, device, None)).float(), y.to(device))
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:  # torchvision asserts sizes
        shape = "x".join(map(str, x.shape[1:]))
        raise ValueError(
            f"--model {cfg.model} does not run on {cfg.dataset} inputs ({shape}, {info.classes} classes): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        model.train(was_training)


# -- the run --------------------------------------------------------------------------------------------------


@dataclass
class _RunState:
    """What an interruption needs to say: where the run is and how far its checkpoints got."""

    out: Path
    epochs: int
    main: bool = True
    started: bool = False  # files in `out` may have been written
    checkpoint_epoch: int | None = None  # epochs held by out/checkpoint.pt, once known
    procs: Processes | None = None  # set once the processes are


def train(
    cfg: TrainConfig,
    given: set[str] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any], Sparsifier | None], None] | None = None,
) -> dict[str, Any]:
    """Train per ``cfg`` and return the final report (also written to ``<out>/report.json``).

    Ctrl-C or SIGTERM stop it with `TrainingInterrupted` (a ``KeyboardInterrupt``) once the run folder has
    been touched: the folder then resumes from its last checkpoint, and the exception (also logged) says where
    that is and the command that continues. Interrupted earlier, it raises the plain ``KeyboardInterrupt``.

    Args:
        cfg: the resolved configuration.
        given: option names set explicitly by the user (checked against a checkpoint on ``--resume``).
        on_epoch_end: called as ``fn(epoch, metrics, sparsifier)`` after each epoch's checkpoint is written, on
            every rank.

    Raises:
        ValueError: a bad configuration or ``--out``; `RunExists` and ``CheckpointError`` are ValueErrors.
        TrainingInterrupted: Ctrl-C / SIGTERM after the run started.
    """
    run = _RunState(Path(cfg.out), cfg.epochs)
    with _sigterm_as_interrupt():
        try:
            return _train(cfg, given or set(), on_epoch_end, run)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            if not run.started and run.checkpoint_epoch is None:
                raise
            checkpoint = run.out / CHECKPOINT if run.checkpoint_epoch is not None else None
            stop = TrainingInterrupted(run.out, checkpoint, run.checkpoint_epoch or 0, run.epochs)
            if run.main:
                log.warning("%s", stop)
            raise stop from None
        finally:
            if run.procs is not None and run.procs.own_group and torch_dist.is_initialized():
                torch_dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    given: set[str],
    on_epoch_end: Callable[[int, dict[str, Any], Sparsifier | None], None] | None,
    run: _RunState,
) -> dict[str, Any]:
    out = Path(cfg.out)
    _check_out(out)
    procs, device = _setup_processes(cfg)
    run.main, run.procs = procs.main, procs
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # Safety checks first: nothing in `out` changes unless the run can actually start.
    saved = None
    if cfg.resume:
        saved = load_checkpoint(out / CHECKPOINT, kind=(CHECKPOINT_FORMAT, SHARDED_FORMAT))
        cfg = _check_resume(saved, cfg, given, out / CHECKPOINT)
        if (saved["format"] == SHARDED_FORMAT) != cfg.fsdp:  # the option is pinned: only a changed file gets here
            raise CheckpointError(f"{out / CHECKPOINT} is a {saved['format']} file, but its run has fsdp {cfg.fsdp}")
        run.epochs, run.checkpoint_epoch = cfg.epochs, int(saved["epoch"])
    elif (out / CHECKPOINT).exists() or (out / "report.json").exists():
        raise RunExists(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    cfg = _fit_ramp(cfg, given, procs.main)
    if cfg.fsdp:
        _setup_sharding(procs, device)
    sparse_cfg = cfg.sparsity_config()
    init = read_init(cfg.init) if cfg.init else None  # read (and refused) before anything is written
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
    if init is not None:
        load_init_(model, init, cfg.model)
    elif sparse_cfg is not None and sparse_cfg.frozen and not saved:
        log.warning("oneshot without --init prunes the random initialization; pass --init DENSE_RUN/checkpoint.pt")
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    calibration = saved.get("calibration") if saved is not None else None
    if cfg.calibrate and saved is None:  # a resumed run's weights are already calibrated (and trained)
        calibration = _calibrate(model, splits.train, info, device, procs, cfg, sparse_cfg)
    sparsifier: Sparsifier | None = sparsify_(model, sparse_cfg) if sparse_cfg is not None else None
    if sparsifier is not None:
        _warn_skipped(model, sparsifier, cfg)
    net: nn.Module = model
    if procs.sharded:  # after sparsify_, on a fresh start and on resume: the state meets the same structure
        blocks = shard_blocks(model, device, procs.world)
        if procs.main:
            log.debug("fully_shard over %d process(es): %s, and the root", procs.world, ", ".join(blocks))
    elif procs.distributed:
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
    _preflight(model, splits.test, info, device, criterion, cfg)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if saved is not None:
        try:
            if procs.sharded:
                _load_sharded(model, optimizer, sparsifier, saved, out / CHECKPOINT)
                rngs = saved["rng"]  # one per process; a run resumed on more processes than it had reuses rank 0's
                rng = rngs[procs.rank] if procs.rank < len(rngs) else rngs[0]
            else:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                if sparsifier is not None:
                    sparsifier.load_state_dict(saved["sparsifier"])
                rng = saved["rng"]
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
            _set_rng_state(rng)
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{out / CHECKPOINT} does not match this run: {exc}") from None
        history, start_epoch = list(saved["history"]), int(saved["epoch"])
        if procs.main:
            log.info(
                "resuming %s after epoch %d of %d: continuing with epoch %d", out, start_epoch, cfg.epochs,
                start_epoch + 1,
            )  # fmt: skip
        if cfg.epochs != int(saved["config"]["epochs"]):
            # --extend: the cosine schedule is re-laid over the new length from the current step on.
            was = optimizer.param_groups[0]["lr"]
            factor = lr_factor(scheduler.last_epoch, total_steps, warmup)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * factor
            log.warning(  # every process adjusts its schedule; the main one says so
                "extending %s from %d to %d epochs: cosine learning-rate schedule re-laid over %d epochs from step "
                "%d (lr %.4g -> %.4g); ramp kept at %s",
                out, saved["config"]["epochs"], cfg.epochs, cfg.epochs, scheduler.last_epoch, was,
                optimizer.param_groups[0]["lr"], cfg.method_ramp or "n/a",
            )  # fmt: skip

    # --init: the accuracy before any fine-tuning step -- the sparsified starting model as its first forward sees
    # it, in eval mode (kept in the checkpoint, so a resumed run reports the same numbers).
    before = saved.get("before_finetune") if saved is not None else None
    if cfg.init and saved is None:
        before = _evaluate_before(model, test_loader, val_loader, info, device, procs)
        if procs.main:
            log.info("before fine-tuning (%s from --init): test top-1 %.2f%%", cfg.method, before["test_top1"])

    arch = {
        "model": cfg.model,
        "in_channels": info.channels,
        "num_classes": info.classes,
        "image_size": info.image_size,
        "dataset": cfg.dataset,
    }
    run.started = True
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is not None and cfg.epochs != int(saved["config"]["epochs"]):
            kept = _keep_final_files(out, int(saved["config"]["epochs"]))
            if kept:
                log.warning(
                    "the %d-epoch run's final files were kept as %s; new ones are written after epoch %d",
                    saved["config"]["epochs"], ", ".join(p.name for p in kept), cfg.epochs,
                )  # fmt: skip
        resolved = {**cfg.to_dict(), "amp": amp, "threads": torch.get_num_threads()}  # the values used
        (out / "config.yaml").write_text(_yaml(resolved))
        with open(out / "metrics.jsonl", "w") as f:  # rewritten from the checkpoint's history on resume
            f.writelines(json.dumps(h) + "\n" for h in history)
    if procs.main:
        ramp = cfg.method_ramp
        ramp_text = f", ramp {ramp[0]:g}-{ramp[1]:g}{' per step' if cfg.per_step else ''}" if ramp else ""
        log.info(
            "%s on %s/%s: %s x %d steps%s, device %s, %d process(es)",
            "dense" if cfg.method == "dense" else f"{cfg.method} {cfg.nm}", cfg.dataset, cfg.model,
            _epochs(cfg.epochs), steps_per_epoch, ramp_text, device, procs.world,
        )  # fmt: skip

    # The rules around an optimizer step (ramp from the step counter, decay on unscaled gradients, masks after a
    # step that happened) are OptimizerSteps', shared with hook_optimizer and the Lightning/HF callbacks.
    steps = OptimizerSteps(sparsifier, steps_per_epoch=steps_per_epoch) if sparsifier is not None else None
    if steps is not None:
        steps.watch(optimizer)
    started = time.time()
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.time()
        p = steps.begin_step(epoch * steps_per_epoch) if steps is not None else 0.0
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
            done = epoch * steps_per_epoch + i  # optimizer steps completed before this one
            if steps is not None:
                steps.begin_step(done)
            x, y = _prepare(x, info, device, gen), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = net(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if steps is not None:  # unscale once (the decay is defined on true gradients), SR-STE decay
                steps.before_optimizer_step(optimizer, scaler)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if steps is not None:  # masks for the next step, from the updated weights
                steps.after_optimizer_step(done + 1)
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            if i % 20 == 0 and not bar.disable:  # .item() waits for the device: only when someone watches
                now = sparsifier.dense_fraction if sparsifier is not None else 0.0
                bar.set_postfix(loss=f"{loss.item():.3f}", p=f"{now:.2f}")

        stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]).double()
        if procs.distributed:
            torch_dist.all_reduce(stats)
        if procs.sharded:  # every process evaluates, and the checkpoint holds, rank 0's BatchNorm statistics
            broadcast_buffers(model)
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
        state = {
            "format": SHARDED_FORMAT if procs.sharded else CHECKPOINT_FORMAT,
            "maxq_version": __version__,
            "config": cfg.to_dict(),
            "arch": arch,
            "epoch": epoch + 1,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            "history": history,
            "before_finetune": before,
            "calibration": calibration,
        }
        if procs.sharded:  # every process writes its shards; the loop's state (each process's RNG) beside them
            rngs: list[Any] = [None] * procs.world
            torch_dist.all_gather_object(rngs, state["rng"])
            save_sharded(_sharded_state(model, optimizer, sparsifier), {**state, "rng": rngs}, out / CHECKPOINT)
        elif procs.main:
            state["model"] = model.state_dict()
            state["optimizer"] = optimizer.state_dict()
            state["sparsifier"] = sparsifier.state_dict() if sparsifier is not None else None
            atomic_save(state, out / CHECKPOINT)
        if procs.main:
            run.checkpoint_epoch = epoch + 1
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            extra = f" val {val['top1']:.2f}%" if val is not None else ""
            log.info(
                "epoch %d/%d  loss %.4f  test top-1 %.2f%%%s  %s  %.0fs",
                epoch + 1, cfg.epochs, record["train_loss"], test["top1"], extra,
                _dense_text(p, sparsifier.dense_fraction if sparsifier is not None else 0.0), record["epoch_time_s"],
            )  # fmt: skip
        run.checkpoint_epoch = epoch + 1
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record, sparsifier)

    report = _finish(cfg, model, sparsifier, history, test_loader, info, device, procs, out, arch, before, calibration)
    if procs.distributed:
        torch_dist.barrier()
    return report


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier | None) -> dict:
    """What a sharded checkpoint holds beside the loop's state: model, optimizer and sparsifier state, sharded."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if sparsifier is not None:
        state["sparsifier"] = sparsifier.state_dict()
    return state


def _load_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier | None, saved: dict, path: Path
) -> None:
    """Restore model, optimizer and sparsifier from the sharded checkpoint whose index is ``saved``."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(model, optimizer, sparsifier)
    load_sharded(state, saved, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if sparsifier is not None:
        sparsifier.load_state_dict(state["sparsifier"])


def _calibrate(
    model: nn.Module,
    train_set: Dataset,
    info: DataInfo,
    device: torch.device,
    procs: Processes,
    cfg: TrainConfig,
    sparse_cfg: Any,
) -> dict[str, Any]:
    """``--calibrate``: prune the ``--init`` model once by Wanda or SparseGPT, from ``cfg.calibration_batches``
    batches of training samples (a permutation seeded by ``--seed``, the same on every process; normalised, not
    augmented), with the training method's pattern and layer selection. The sparsifier that follows keeps exactly
    these survivors (one-shot: fixed; SR-STE and MaxQ start from them). Returns the calibration report."""
    count = min(cfg.calibration_batches * cfg.batch_size, len(train_set))
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[:count].tolist()
    batches = []
    for start in range(0, count, cfg.batch_size):
        x, _ = default_collate([train_set[i] for i in order[start : start + cfg.batch_size]])
        batches.append(_prepare(x, info, device, None))
    calibration = calibration_for(sparse_cfg, cfg.calibrate)
    report = calibrate_(model, batches, calibration, progress=procs.main and cfg.progress)
    if procs.distributed:  # every process starts from rank 0's weights (float rounding may differ by device)
        for module in (model.get_submodule(r.name) for r in report.pruned):
            torch_dist.broadcast(module.weight.data, 0)
    if procs.main:
        log.info(
            "calibrated %s %s on %d layer(s) from %d samples in %.1f s", cfg.calibrate, cfg.nm, len(report.pruned),
            count, report.seconds,
        )  # fmt: skip
    return {**report.to_dict(), "samples": count}


def _dense_text(start: float, end: float) -> str:
    """The ramp's dense fraction ``p`` over an epoch for its log line: the value the epoch's evaluation used (at
    its end), with the start when a per-step ramp moved it during the epoch (``p 1.00->0.67``)."""
    return f"p {end:.2f}" if start == end else f"p {start:.2f}->{end:.2f}"


def _weight_layers(model: nn.Module) -> list[str]:
    """Names of the model's Conv2d and Linear layers (the layers N:M could apply to)."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def _warn_skipped(model: nn.Module, sparsifier: Sparsifier, cfg: TrainConfig) -> None:
    """Warn when layers the default selection wanted stay dense (pattern does not fit them)."""
    refused = [c for c in sparsifier.choices if c.requested and not c.selected]
    if refused:
        total = len(_weight_layers(model))
        log.warning(
            "only %d of %d Conv2d/Linear layers can be %s; dense: %s",
            len(sparsifier.layers), total, cfg.nm, "; ".join(f"layer {c.name} ({c.kind}: {c.reason})" for c in refused),
        )  # fmt: skip


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
    before: dict[str, float] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fold, verify, evaluate the folded model, and write report.json, model_folded.pt and the plot."""
    n, m = cfg.n_m
    ramp_finished = sparsifier is None or sparsifier.ramp_finished
    weight_layers = _weight_layers(model)
    layout = None
    if sparsifier is not None:
        skipped = [{"layer": c.name, "type": c.kind, "reason": c.reason} for c in sparsifier.choices if not c.selected]
        fold_(model, force=not ramp_finished)  # an unfinished ramp is pruned to N:M now (logged)
        layout = nm_layout(model)
    else:
        skipped = []
    folded = evaluate(model, test_loader, info, device, procs)
    if procs.sharded:  # the whole folded model, on rank 0 only; its numbers sent to every process
        weights = full_model_state(model)
        facts: list[Any] = [None, 0, 0]  # nm_ok, parameters, nonzero parameters
        if procs.main:
            names = [name for name, _ in model.named_parameters()]
            layers = layout.layers if layout is not None else None
            nm_ok = check_nm(weights, n, m, layers=layers).ok if sparsifier is not None else None
            facts = [nm_ok, sum(weights[k].numel() for k in names), sum(int((weights[k] != 0).sum()) for k in names)]
        torch_dist.broadcast_object_list(facts, 0)
        nm_ok, total, nonzero = facts
    else:
        weights = model.state_dict()
        nm_ok = check_nm(model, n, m).ok if sparsifier is not None else None
        total = sum(p.numel() for p in model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    tops = [h["test_top1"] for h in history]
    best = int(np.argmax(tops)) if tops else 0
    report: dict[str, Any] = {
        "method": cfg.method,
        "nm": None if cfg.method == "dense" else cfg.nm,
        "n": None if cfg.method == "dense" else n,
        "m": None if cfg.method == "dense" else m,
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
        "ramp": list(cfg.method_ramp) if cfg.method_ramp else None,  # the ramp followed (see _fit_ramp)
        "ramp_per_step": cfg.per_step if cfg.method_ramp else None,
        "ramp_finished": ramp_finished,
        "params_total": total,
        "params_nonzero": nonzero,
        "layers_total": len(weight_layers),  # Conv2d + Linear layers of the model
        "layers_sparsified": len(layout.layers) if layout else 0,
        "sparse_layers": list(layout.layers) if layout else [],
        "dense_layers": skipped,
        "train_time_s": history[-1]["elapsed_s"] if history else 0.0,
        "variant": cfg.extra.get("variant"),
        "maxq_version": __version__,
    }
    if before is not None:
        report["before_finetune"] = before  # --init: eval of the sparsified starting model, before any step
    if calibration is not None:
        report["calibration"] = calibration  # --calibrate: what the calibrated one-shot prune did, per layer
    if history and "val_top1" in history[-1]:
        vals = [h["val_top1"] for h in history]
        report.update(val_top1_last=vals[-1], val_top1_best=max(vals))
    if procs.main:
        atomic_save(folded_file(weights, layout, arch, cfg.to_dict()), out / "model_folded.pt")
        from .plots import plot_run

        plot_run(history, cfg, out / "curves.png", folded["top1"])
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
