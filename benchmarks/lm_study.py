"""Language-model study: a trained GPT-2-architecture model made 2:4 by calibrated one-shot pruning (magnitude,
Wanda, SparseGPT, mask then fixed) or by moving masks (SR-STE, gradual magnitude N:M, MaxQ), test perplexity
before any fine-tuning step and after each budget, 3 seeds (configs/study_lm.yaml; docs/RESULTS.md §8).

    python benchmarks/lm_study.py --config configs/study_lm.yaml                 # every run (resumable)
    python benchmarks/lm_study.py --config configs/study_lm.yaml --report        # summary.json, plot, RESULTS §8
    python benchmarks/lm_study.py --config configs/study_lm.yaml --quick --inline    # seconds: a rehearsal

Runs: ``parent`` (trained from scratch; checkpointed every ``eval_every`` steps, so an interrupted parent resumes
exactly), then ``<arm>_b<budget>_s<seed>`` for every arm, budget and seed. Each run is a subprocess (``--run ID``,
``--jobs`` at a time on ``--threads`` threads each) that writes ``<results>/<id>.json``; a run whose record exists
is skipped, so the study can be stopped and continued. Every record carries its command, the versions, its wall
time, the corpus identity (SHA-256 of the sorted file list and of the contents) and the tokenizer's and parent's
SHA-256. ``--inline`` runs everything in this process (the test suite's rehearsal).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# benchmarks/ must not be on the import path: its accelerate.py would stand in for the accelerate package that
# transformers imports. The sibling modules are loaded by file instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _sibling(name: str) -> Any:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


lm_corpus = _sibling("lm_corpus")
_study = _sibling("study")
_mean_std, _Progress, _replace_block, _seeds = _study._mean_std, _study._Progress, _study._replace_block, _study._seeds
_write_json, paired_test = _study._write_json, _study.paired_test

TAG = "study_lm"
NOT_RECORDS = ("summary.json", "status.json")

# -- the spec ---------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def effective(spec: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The spec, with its ``quick`` overrides merged in when asked."""
    return _merge(spec, spec.get("quick", {})) if quick else spec


@dataclass
class Run:
    id: str
    arm: str | None = None  # None: the parent
    budget: int = 0
    seed: int = 0
    after: list[str] = field(default_factory=list)


def plan(spec: dict[str, Any]) -> list[Run]:
    """The parent, then every arm x budget x seed, seed by seed (a study cut short has every cell at seed 0)."""
    ft = spec["finetune"]
    runs = [Run("parent")]
    for seed in ft["seeds"]:
        for budget in ft["budgets"]:
            for arm in ft["arms"]:
                runs.append(Run(f"{arm}_b{budget}_s{seed}", arm, budget, seed, ["parent"]))
    return runs


def folders(spec: dict[str, Any], results: Path) -> dict[str, Path]:
    return {
        "tokenizer": results / "tokenizer.json",  # kept with the records (small, and the parent depends on it)
        "parent": results / "parent",  # the parent's save_pretrained folder, kept with the records
        "runs": results / "runs",  # checkpoints and caches (not records)
    }


# -- data -------------------------------------------------------------------------------------------------------


def prepare(spec: dict[str, Any], results: Path, *, train_tokenizer: bool) -> dict[str, Any]:
    """Corpus, tokenizer (trained once, by the parent) and the token streams."""
    where = folders(spec, results)
    corpus = lm_corpus.stdlib_corpus(limit=spec["corpus"].get("limit"))
    if not where["tokenizer"].exists():
        if not train_tokenizer:
            raise FileNotFoundError(f"{where['tokenizer']} is missing: the parent run trains it first")
        lm_corpus.train_tokenizer(corpus, spec["corpus"]["vocab_size"], where["tokenizer"])
    streams = lm_corpus.token_streams(corpus, where["tokenizer"], where["runs"] / "cache")
    return {"corpus": corpus, "streams": streams, "tokenizer_sha256": lm_corpus.sha256_of(where["tokenizer"])}


def batch_at(stream: torch.Tensor, step: int, stream_seed: int, batch_size: int, length: int) -> torch.Tensor:
    """The training batch of ``step``: ``batch_size`` windows at offsets drawn from a generator seeded by
    ``(stream_seed, step)`` alone, so a resumed run draws the same batches."""
    g = torch.Generator().manual_seed(stream_seed * 1_000_003 + step)
    offsets = torch.randint(0, len(stream) - length, (batch_size,), generator=g)
    return torch.stack([stream[o : o + length] for o in offsets.tolist()]).long()


@torch.no_grad()
def perplexity(
    model: nn.Module, stream: torch.Tensor, length: int, batch_size: int, max_tokens: int | None = None
) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``length`` tokens (the first ``max_tokens``)."""
    tokens = stream if max_tokens is None else stream[:max_tokens]
    windows = tokens[: len(tokens) // length * length].view(-1, length).long()
    was = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for x in windows.split(batch_size):
        logits = model(input_ids=x).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")
        count += x[:, 1:].numel()
    model.train(was)
    return math.exp(float(total) / count)


def evaluate(model: nn.Module, data: dict[str, Any], spec: dict[str, Any]) -> dict[str, float]:
    """Test perplexity on every test token (``eval.max_tokens``: the first that many), val on ``eval.val_tokens``."""
    length, ev = spec["model"]["n_positions"], spec["eval"]
    test = perplexity(model, data["streams"]["test"], length, ev["batch_size"], ev.get("max_tokens"))
    val = perplexity(model, data["streams"]["val"], length, ev["batch_size"], ev.get("val_tokens"))
    return {"test_ppl": test, "val_ppl": val}


def curve_ppl(model: nn.Module, data: dict[str, Any], spec: dict[str, Any]) -> float:
    ev = spec["eval"]
    return perplexity(model, data["streams"]["val"], spec["model"]["n_positions"], ev["batch_size"], ev["curve_tokens"])


# -- model and optimisation -------------------------------------------------------------------------------------


def build_model(spec: dict[str, Any], vocab_size: int, eos: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=eos,
        eos_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **spec["model"],
    )
    return GPT2LMHeadModel(config)


def optimizer_for(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` (step is 0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def versions() -> dict[str, str]:
    import tokenizers
    import transformers

    import maxq

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "src", "benchmarks", "configs"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "maxq": maxq.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- the runs ---------------------------------------------------------------------------------------------------


def run_parent(spec: dict[str, Any], results: Path, data: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train the dense parent from scratch (resumable from its checkpoint) and save it with ``save_pretrained``."""
    from tokenizers import Tokenizer

    where = folders(spec, results)
    p = spec["parent"]
    length = spec["model"]["n_positions"]
    tokenizer = Tokenizer.from_file(str(where["tokenizer"]))
    torch.manual_seed(p["seed"])
    model = build_model(spec, tokenizer.get_vocab_size(), tokenizer.token_to_id(lm_corpus.EOS))
    optimizer = optimizer_for(model, p["lr"], p["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, p["steps"], p["warmup"]))
    checkpoint = where["runs"] / "parent" / "checkpoint.pt"
    start, curve, elapsed = 0, [], 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
        print(f"parent: resuming after step {start}", file=sys.stderr)
    train = data["streams"]["train"]
    began, losses = time.time(), []
    model.train()
    for step in range(start, p["steps"]):
        x = batch_at(train, step, p["seed"], p["batch_size"], length)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if (step + 1) % p["eval_every"] == 0 or step + 1 == p["steps"]:
            train_loss = float(torch.stack(losses).mean())
            losses = []
            curve.append({"step": step + 1, "train_loss": train_loss, "val_ppl": curve_ppl(model, data, spec)})
            now = elapsed + time.time() - began
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step + 1,
                    "curve": curve,
                    "elapsed_s": now,
                },
                checkpoint,
            )
            print(
                f"parent: step {step + 1}/{p['steps']} loss {train_loss:.3f} val ppl {curve[-1]['val_ppl']:.2f} "
                f"({now:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    model.save_pretrained(where["parent"])
    scores = evaluate(model, data, spec)
    return {
        "role": "parent",
        **scores,
        "steps": p["steps"],
        "curve": curve,
        "train_time_s": elapsed + time.time() - began,
        "threads": threads,
        "parent_sha256": lm_corpus.sha256_of(where["parent"] / "model.safetensors"),
        "params": sum(t.numel() for t in model.parameters()),
    }


def calibration_batches(spec: dict[str, Any], data: dict[str, Any], seed: int) -> list[dict[str, torch.Tensor]]:
    """``calibration.sequences`` windows of the train split at offsets seeded by the run's seed."""
    cal = spec["finetune"]["calibration"]
    x = batch_at(data["streams"]["train"], 0, 777_777 + seed, cal["sequences"], spec["model"]["n_positions"])
    return [{"input_ids": chunk} for chunk in x.split(cal["batch_size"])]


def sparsity_config(spec: dict[str, Any], arm: dict[str, Any]) -> Any:
    """The arm's maxq config; the ramp (MaxQ arms) is in units of the budget: progress = step / budget."""
    import maxq

    n, m = maxq.parse_nm(spec["finetune"]["nm"])
    if arm["method"] == "dense":
        return None
    options = dict(arm.get("options", {}))
    if arm["method"] == "maxq":
        options.update(ramp=(0.0, float(spec["finetune"]["ramp_share"])), per_step=True)
    return maxq.make_config(arm["method"], n=n, m=m, **options)


def run_child(spec: dict[str, Any], results: Path, data: dict[str, Any], run: Run, threads: int) -> dict[str, Any]:
    """One arm at one budget and seed, from the parent: (calibrate,) sparsify, measure, fine-tune, fold, measure."""
    from transformers import GPT2LMHeadModel

    import maxq

    where = folders(spec, results)
    parent_record = json.loads((results / "parent.json").read_text())
    parent_sha = lm_corpus.sha256_of(where["parent"] / "model.safetensors")
    if parent_sha != parent_record["parent_sha256"]:
        raise RuntimeError(f"{where['parent']} is not the parent recorded in parent.json (SHA-256 differs)")
    ft = spec["finetune"]
    arm = ft["arms"][run.arm]
    n, m = maxq.parse_nm(ft["nm"])
    length = spec["model"]["n_positions"]
    torch.manual_seed(run.seed)
    model = GPT2LMHeadModel.from_pretrained(where["parent"])
    began = time.time()
    calibration = None
    if arm.get("calibrate"):
        report = maxq.calibrate_(
            model, calibration_batches(spec, data, run.seed), method=arm["calibrate"], n=n, m=m, progress=False
        )
        calibration = {
            "method": report.method,
            "seconds": report.seconds,
            "batches": report.batches,
            "layers": len(report.pruned),
            "kept_zeros": sum(r.kept_zeros for r in report.pruned),
            "loss": [r.loss for r in report.pruned],
        }
    config = sparsity_config(spec, arm)
    sparsifier = maxq.sparsify_(model, config) if config is not None else None
    before = evaluate(model, data, spec)
    optimizer = optimizer_for(model, ft["lr"], ft["weight_decay"])
    warmup = max(1, round(ft["warmup_share"] * run.budget))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run.budget, warmup))
    points = {round(run.budget * (i + 1) / ft["curve_points"]) for i in range(ft["curve_points"])}
    curve = [{"step": 0, "train_loss": None, "val_ppl": curve_ppl(model, data, spec)}]
    train, losses = data["streams"]["train"], []
    model.train()
    for step in range(run.budget):
        x = batch_at(train, step, 1_000 + run.seed, ft["batch_size"], length)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if sparsifier is not None:
            sparsifier.regularize_()  # SR-STE / MaxQ decay on the pruned weights (none for one-shot)
        optimizer.step()
        schedule.step()
        if sparsifier is not None:
            sparsifier.step((step + 1) / run.budget)  # progress in budgets: the ramp's unit
        losses.append(loss.detach())
        if step + 1 in points:
            curve.append(
                {
                    "step": step + 1,
                    "train_loss": float(torch.stack(losses).mean()),
                    "val_ppl": curve_ppl(model, data, spec),
                }
            )
            losses = []
    nm_ok = None
    if sparsifier is not None:
        layers = sparsifier.layers
        maxq.fold_(model)
        nm_ok = maxq.check_nm(model, n, m, layers).ok
    after = evaluate(model, data, spec)
    record = {
        "arm": run.arm,
        "method": arm["method"],
        "calibrate": arm.get("calibrate"),
        "n": n,
        "m": m,
        "budget": run.budget,
        "seed": run.seed,
        "test_ppl_before": before["test_ppl"],
        "val_ppl_before": before["val_ppl"],
        **after,
        "curve": curve,
        "nm_ok": nm_ok,
        "calibration": calibration,
        "train_time_s": time.time() - began,
        "threads": threads,
        "parent": {"sha256": parent_sha, "test_ppl": parent_record["test_ppl"], "val_ppl": parent_record["val_ppl"]},
    }
    return record


def run_one(spec: dict[str, Any], results: Path, run: Run, threads: int, command: str) -> dict[str, Any]:
    """Carry out one run and write its record (atomically)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the logs are the runs' own
    torch.set_num_threads(threads)
    started = time.time()
    code = versions()  # the code the run starts with (the tree may move on while it runs)
    data = prepare(spec, results, train_tokenizer=run.arm is None)
    body = run_parent(spec, results, data, threads) if run.arm is None else run_child(spec, results, data, run, threads)
    record = {
        "id": run.id,
        **body,
        "corpus": data["corpus"].describe(),
        "tokenizer_sha256": data["tokenizer_sha256"],
        "tokens": {k: len(v) for k, v in data["streams"].items()},
        "model": spec["model"],
        "command": command,
        "versions": code,
        "wall_time_s": time.time() - started,
    }
    _write_json(results / f"{run.id}.json", record)
    return record


# -- execution --------------------------------------------------------------------------------------------------


def execute(runs: list[Run], results: Path, args: argparse.Namespace, spec_path: Path) -> list[str]:
    """Run what has no record yet, ``args.jobs`` at a time (or inline), parents first; returns the failed ids."""
    todo = [r for r in runs if not (results / f"{r.id}.json").exists()]
    done = {r.id for r in runs if r not in todo}
    failed: list[str] = []
    progress = _Progress(len(runs), len(done))
    spec = effective(yaml.safe_load(spec_path.read_text()), args.quick)
    started = time.time()
    if args.inline:
        for run in todo:
            if any(dep in failed for dep in run.after):
                failed.append(run.id)
                continue
            record = run_one(spec, results, run, args.threads, f"(inline) {' '.join(sys.argv)}")
            progress.update(f"{run.id}: test ppl {record['test_ppl']:.2f}")
        progress.close()
        return failed
    (results / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    durations: dict[str, float] = {}

    def status() -> None:
        _write_json(
            results / "status.json",
            {
                "planned": [r.id for r in runs],
                "finished": sorted(done),
                "running": sorted(running),
                "failed": failed,
                "durations_s": durations,
                "elapsed_s": round(time.time() - started, 1),
                "jobs": args.jobs,
                "threads": args.threads,
            },
        )

    status()
    while todo or running:
        for run in list(todo):
            if len(running) >= args.jobs:
                break
            if any(dep in failed for dep in run.after):
                todo.remove(run)
                failed.append(run.id)
                continue
            if not all(dep in done for dep in run.after):
                continue
            threads = args.parent_threads or args.threads if run.arm is None else args.threads
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--config",
                str(spec_path),
                "--results",
                str(results),
                "--run",
                run.id,
                "--threads",
                str(threads),
            ] + (["--quick"] if args.quick else [])
            log = open(results / "logs" / f"{run.id}.log", "a")  # noqa: SIM115 - closed when the run ends
            running[run.id] = (
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                log,
                time.time(),
            )
            todo.remove(run)
            status()
        time.sleep(1.0)
        for run_id, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[run_id]
            if proc.returncode == 0 and (results / f"{run_id}.json").exists():
                done.add(run_id)
                durations[run_id] = round(time.time() - t0, 1)
                record = json.loads((results / f"{run_id}.json").read_text())
                progress.update(f"{run_id}: test ppl {record['test_ppl']:.2f}")
            else:
                failed.append(run_id)
                print(
                    f"\nrun {run_id} failed (exit {proc.returncode}); see {results / 'logs' / (run_id + '.log')}",
                    file=sys.stderr,
                )
                progress.update(f"{run_id}: failed")
            status()
    progress.close()
    return failed


# -- report -----------------------------------------------------------------------------------------------------

#: Llama-2-7B at 2:4, WikiText perplexity, no fine-tuning (Sun et al. 2023, Wanda paper, table of N:M results).
ANCHOR = {
    "model": "Llama-2-7B, WikiText (Wanda paper)",
    "dense": 5.12,
    "magnitude": 54.6,
    "sparsegpt": 10.17,
    "wanda": 11.02,
}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(records: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """Per arm and budget over seeds: test/val perplexity before and after, the mean val curve; paired gaps."""
    ft = spec["finetune"]
    parent = next((r for r in records if r["id"] == "parent"), None)
    children = [r for r in records if r.get("arm")]
    by_cell: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in children:
        by_cell.setdefault((r["arm"], r["budget"]), {})[r["seed"]] = r
    cells: dict[str, dict[str, Any]] = {}
    for arm in ft["arms"]:
        for budget in ft["budgets"]:
            rows = [r for _, r in sorted(by_cell.get((arm, budget), {}).items())]
            if not rows:
                continue
            cell = {"seeds": [r["seed"] for r in rows], "nm_ok": all(r["nm_ok"] is not False for r in rows)}
            for key in ("test_ppl_before", "val_ppl_before", "test_ppl", "val_ppl", "train_time_s"):
                cell[key] = [r[key] for r in rows]
            length = min(len(r["curve"]) for r in rows)
            cell["curve"] = [
                {
                    "step": rows[0]["curve"][i]["step"],
                    "val_ppl": statistics.fmean(r["curve"][i]["val_ppl"] for r in rows),
                }
                for i in range(length)
            ]
            cal = [r["calibration"]["seconds"] for r in rows if r.get("calibration")]
            cell["calibration_s"] = cal
            cells.setdefault(arm, {})[str(budget)] = cell
    gaps: dict[str, dict[str, Any]] = {}
    for a, b in spec.get("report", {}).get("pairs", []):
        for budget in ft["budgets"]:
            ra, rb = by_cell.get((a, budget), {}), by_cell.get((b, budget), {})
            seeds = sorted(set(ra) & set(rb))
            if seeds:
                gaps.setdefault(f"{a} - {b}", {})[str(budget)] = {
                    key: paired_test([ra[s][key] for s in seeds], [rb[s][key] for s in seeds])
                    for key in ("test_ppl", "val_ppl", "test_ppl_before")
                }
    best = {}
    for budget in ft["budgets"]:
        scores = {
            arm: _mean(c[str(budget)]["val_ppl"]) for arm, c in cells.items() if arm != "dense" and str(budget) in c
        }
        if scores:
            arm = min(scores, key=scores.get)
            best[str(budget)] = {
                "arm": arm,
                "val_ppl": scores[arm],
                "test_ppl": _mean(cells[arm][str(budget)]["test_ppl"]),
            }
    first = children[0] if children else parent
    return {
        "parent": None
        if parent is None
        else {
            k: parent.get(k)
            for k in ("test_ppl", "val_ppl", "steps", "params", "parent_sha256", "train_time_s", "curve")
        },
        "parents_seen": sorted({r["parent"]["sha256"] for r in children}),
        "corpus": None if first is None else first["corpus"],
        "tokenizer_sha256": sorted({r["tokenizer_sha256"] for r in records}),
        "cells": cells,
        "gaps": gaps,
        "best_sparse_by_val": best,
        "anchor": ANCHOR,
        "records": len(records),
        "wall_time_s": sum(r.get("wall_time_s", 0.0) for r in records),
    }


def _label(spec: dict[str, Any], arm: str) -> str:
    return f"{arm} ({spec['finetune']['arms'][arm]['label']})"


def _ppl(values: list[float]) -> str:
    return _mean_std(values) if values else "—"


def markdown(summary: dict[str, Any], spec: dict[str, Any], plot_name: str) -> str:
    ft = spec["finetune"]
    budgets = [str(b) for b in ft["budgets"]]
    parent = summary["parent"] or {}
    lines = ["<!-- generated by benchmarks/lm_study.py --report; edit the surrounding docs, not this block -->", ""]
    corpus = summary.get("corpus") or {}
    if parent:
        model = json.dumps(spec["model"])
        lines += [
            f"**Parent**: GPT-2 architecture `{model}`, {parent.get('params', 0) / 1e6:.2f} M parameters, trained "
            f"{parent.get('steps')} steps from scratch: test perplexity **{parent['test_ppl']:.2f}**, val "
            f"{parent['val_ppl']:.2f}; `model.safetensors` SHA-256 `{parent.get('parent_sha256')}`.",
            "",
        ]
    if corpus:
        files = " / ".join(str(v) for v in (corpus.get("files") or {}).values())
        lines += [
            f"**Corpus**: Python {corpus.get('python')} standard library, {files} files (train / val / test); file "
            f"list SHA-256 `{corpus.get('files_sha256')}`, contents `{corpus.get('content_sha256')}`; tokenizer "
            f"SHA-256 `{', '.join(summary['tokenizer_sha256'])}`.",
            "",
        ]
    if len(summary["parents_seen"]) > 1:
        lines += [f"**Warning:** the runs started from {len(summary['parents_seen'])} different parents.", ""]
    header = "| arm | before fine-tuning | " + " | ".join(f"after {b} steps" for b in budgets) + " |"
    for key, title in (("test", "Test"), ("val", "Val")):
        where = (
            "every test token" if key == "test" else f"the first {spec['eval'].get('val_tokens') or 'all'} val tokens"
        )
        lines += [
            f"**{title} perplexity** on {where} (mean ± std over seeds; before = the pruned parent, no step taken):",
            "",
            header,
            "|---" * (2 + len(budgets)) + "|",
        ]
        if parent:
            lines.append(f"| parent (dense, no fine-tuning) | {parent[f'{key}_ppl']:.2f} |" + " |" * len(budgets))
        for arm in ft["arms"]:
            c = summary["cells"].get(arm, {})
            if not c:
                continue
            before = [v for b in budgets if b in c for v in c[b][f"{key}_ppl_before"]]
            seeds = sorted({s for b in budgets if b in c for s in c[b]["seeds"]})
            row = [_ppl(before)] + [_ppl(c[b][f"{key}_ppl"]) if b in c else "—" for b in budgets]
            lines.append(f"| {_label(spec, arm)}, {_seeds(len(seeds))} | " + " | ".join(row) + " |")
        lines.append("")
    anchor = summary["anchor"]
    ours = {
        arm: _mean([v for c in summary["cells"].get(arm, {}).values() for v in c["test_ppl_before"]])
        for arm in ("magnitude", "wanda", "sparsegpt")
    }
    if parent and all(v is not None for v in ours.values()):
        lines += [
            "**Beside the anchor** (2:4 before any fine-tuning; perplexity, and its ratio to the dense model's):",
            "",
            "| | dense | magnitude | SparseGPT | Wanda | order |",
            "|---|---|---|---|---|---|",
        ]

        def row(name: str, dense: float, mag: float, sgpt: float, wanda: float) -> str:
            order = " < ".join(
                k
                for k, _ in sorted({"SparseGPT": sgpt, "Wanda": wanda, "magnitude": mag}.items(), key=lambda kv: kv[1])
            )
            cells = [f"{v:.2f} ({v / dense:.2f}x)" for v in (mag, sgpt, wanda)]
            return f"| {name} | {dense:.2f} | " + " | ".join(cells) + f" | {order} |"

        lines.append(row(anchor["model"], anchor["dense"], anchor["magnitude"], anchor["sparsegpt"], anchor["wanda"]))
        lines.append(
            row("ours (test, mean over seeds)", parent["test_ppl"], ours["magnitude"], ours["sparsegpt"], ours["wanda"])
        )
        lines.append("")
    if summary["gaps"]:
        lines += [
            "**Paired gaps** (test perplexity, mean ± s.e. over seeds, two-sided paired t-test):",
            "",
            "| pair | budget | before fine-tuning | p | after | p |",
            "|---|---|---|---|---|---|",
        ]

        def cell(g: dict[str, Any]) -> str:
            se = "" if math.isnan(g["se"]) else f" ± {g['se']:.2f}"
            return f"{g['gap']:+.2f}{se} | " + ("—" if math.isnan(g["p"]) else f"{g['p']:.3f}")

        for pair, by_b in summary["gaps"].items():
            for b, g in by_b.items():
                lines.append(
                    f"| {pair} | {b} steps ({_seeds(g['test_ppl']['pairs'])}) | {cell(g['test_ppl_before'])} "
                    f"| {cell(g['test_ppl'])} |"
                )
        lines.append("")
    if summary["best_sparse_by_val"]:
        parts = [
            f"{b} steps: {v['arm']} (val {v['val_ppl']:.2f}, test {v['test_ppl']:.2f})"
            for b, v in summary["best_sparse_by_val"].items()
        ]
        lines += ["**Best 2:4 arm by val perplexity** (the report's draft for the verdict): " + "; ".join(parts), ""]
    seconds = [v for c in summary["cells"].values() for b in c.values() for v in b["train_time_s"]]
    lines += [
        f"![perplexity before and during fine-tuning]({plot_name})",
        "",
        f"Runs: {summary['records']} records in `{spec.get('results', 'results/lm')}/`; fine-tuning lr "
        f"{ft['lr']:g} (cosine, {ft['warmup_share']:.0%} warm-up), batch {ft['batch_size']} x "
        f"{spec['model']['n_positions']} tokens; calibration {ft['calibration']['sequences']} sequences; compute in "
        f"the records {summary['wall_time_s'] / 3600:.2f} h"
        + (f" (fine-tuning runs {min(seconds):.0f}-{max(seconds):.0f} s)" if seconds else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], spec: dict[str, Any], path: Path) -> None:
    """Left: test perplexity before fine-tuning per arm (log scale). Then per budget: mean val perplexity (curve
    subset) against fine-tuning steps, with the parent's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = spec["finetune"]
    budgets = [str(b) for b in ft["budgets"]]
    fig, axes = plt.subplots(1, 1 + len(budgets), figsize=(5.5 * (1 + len(budgets)), 4.2), squeeze=False)
    axes = axes[0]
    parent = summary.get("parent") or {}
    arms = [a for a in ft["arms"] if summary["cells"].get(a)]
    before = [_mean([v for c in summary["cells"][a].values() for v in c["test_ppl_before"]]) for a in arms]
    axes[0].bar(range(len(arms)), before, color=[f"C{i}" for i in range(len(arms))])
    axes[0].set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    axes[0].set_yscale("log")
    axes[0].set(ylabel="test perplexity (log)", title="2:4, before any fine-tuning step")
    if parent:
        axes[0].axhline(parent["test_ppl"], color="k", lw=1, label=f"parent ({parent['test_ppl']:.2f})")
        axes[0].legend(fontsize=8)
    for ax, b in zip(axes[1:], budgets):
        for i, arm in enumerate(ft["arms"]):
            c = summary["cells"].get(arm, {}).get(b)
            if not c:
                continue
            ax.plot(
                [p["step"] for p in c["curve"]],
                [p["val_ppl"] for p in c["curve"]],
                "o-",
                ms=3,
                color=f"C{i}",
                label=f"{arm} ({len(c['seeds'])})",
            )
        if parent and parent.get("curve"):
            ax.axhline(parent["curve"][-1]["val_ppl"], color="k", lw=1, label="parent")
        ax.set_yscale("log")
        ax.set(xlabel="fine-tuning step", ylabel="val perplexity (curve subset, log)", title=f"{b} fine-tuning steps")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(spec: dict[str, Any], results: Path, docs: Path) -> dict[str, Any]:
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if p.name not in NOT_RECORDS]
    records = [r for r in records if "id" in r]
    summary = summarize(records, spec)
    _write_json(results / "summary.json", summary)
    docs.mkdir(parents=True, exist_ok=True)
    plot_path = docs / f"{TAG}.png"
    try:
        plot(summary, spec, plot_path)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    _replace_block(docs / "RESULTS.md", TAG, markdown(summary, spec, plot_path.name))
    return summary


# -- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "study_lm.yaml")
    ap.add_argument("--quick", action="store_true", help="a tiny rehearsal (<results>/quick; reports there)")
    ap.add_argument("--results", type=Path, help="records folder (default: the spec's results, + quick/)")
    ap.add_argument("--docs", type=Path, help="where --report writes RESULTS.md and the plot (default docs/)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (subprocesses)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument(
        "--parent-threads", type=int, help="torch threads of the parent (it trains alone; default --threads)"
    )
    ap.add_argument("--inline", action="store_true", help="run in this process, one after the other")
    ap.add_argument("--run", help="carry out this one run and write its record (what the study's subprocesses do)")
    ap.add_argument("--report", action="store_true", help="only aggregate the finished records")
    ap.add_argument("--list", action="store_true", help="print the planned runs and exit")
    args = ap.parse_args(argv)
    spec = effective(yaml.safe_load(args.config.read_text()), args.quick)
    results = args.results or (ROOT / spec.get("results", "results/lm") / ("quick" if args.quick else ""))
    results.mkdir(parents=True, exist_ok=True)
    runs = plan(spec)
    if args.list:
        for r in runs:
            print(r.id)
        return 0
    if args.run:
        run = next((r for r in runs if r.id == args.run), None)
        if run is None:
            raise SystemExit(f"unknown run {args.run!r}; see --list")
        run_one(spec, results, run, args.threads, " ".join([sys.executable, *sys.argv]))
        return 0
    failed: list[str] = []
    if not args.report:
        failed = execute(runs, results, args, args.config)
    docs = results if args.quick else (args.docs or ROOT / "docs")
    summary = report(spec, results, docs)
    print(json.dumps({"best_sparse_by_val": summary["best_sparse_by_val"], "records": summary["records"]}, indent=1))
    print(f"tables: {docs / 'RESULTS.md'}\nsummary (JSON): {results / 'summary.json'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
