"""Accuracy study: methods x N:M patterns x seeds (+ MaxQ ablations) on Fashion-MNIST, from one YAML.

    python benchmarks/study.py --config configs/study.yaml             # the full grid (resumable)
    python benchmarks/study.py --config configs/study.yaml --quick     # minutes: a smoke test of the pipeline
    python benchmarks/study.py --config configs/study.yaml --report    # tables and plot from what has finished

Every run is an ordinary ``maxq train`` command (its YAML is written next to its folder, so it can be rerun by
hand). A run whose record ``<results>/<id>.json`` exists is skipped; an interrupted run resumes from its
checkpoint; so the study can be stopped and continued across sessions. ``--jobs`` runs that many trainings at
once, each with ``--threads`` CPU threads (small models use two cores better as two one-thread runs).

A spec may name its own folders (``results``, ``docs_dir``; default ``results/`` and ``docs/``): the GPU study
(``configs/study_gpu.yaml``, run with ``--device cuda``) keeps its records in ``results/gpu/`` and its report there
too, apart from the CPU study's. ``--deadline`` starts no run that would not finish in time, judged by the longest
finished run; the progress of the runs is kept in ``<results>/status.json`` as they start and end.

``oneshot`` is ASP-style within the same epoch budget: a dense run for ``oneshot.dense_epochs`` epochs
(shared by all patterns of a seed), then prune once and fine-tune for the remaining epochs.
"""

from __future__ import annotations

import argparse
import hashlib
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECORD_KEYS = ("top1_last", "top1_best", "val_top1_last", "val_top1_best", "top1_folded", "nm_ok", "train_time_s")


@dataclass
class Run:
    id: str
    options: dict[str, Any]  # maxq train options
    record: dict[str, Any]  # method, n, m, seed, variant: copied into the result record
    after: list[str] = field(default_factory=list)  # run ids that must finish first


def main_variant_of(spec: dict[str, Any]) -> str:
    """The variant name of a study's main grid (``main``; a study with a ``name`` uses it, e.g. ``long``), so
    records of different studies never pass for each other."""
    return spec.get("name", "main")


def _tag(spec: dict[str, Any]) -> str:
    """The name of a study's block in RESULTS.md and of its plots: ``study`` for the main study, ``study_<name>``."""
    return "study" if main_variant_of(spec) == "main" else f"study_{main_variant_of(spec)}"


def _nm_tag(nm: str) -> str:
    return nm.replace(":", "-")


def effective(spec: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The study spec, with the ``quick`` overrides applied when asked (and no ablations then)."""
    if not quick:
        return spec
    q = spec.get("quick", {})
    out = {**spec, "base": {**spec["base"], **q.get("base", {})}, "ablations": []}
    if "grid" in spec:
        out["grid"] = {**spec["grid"], "extra_seeds": {}, **q.get("grid", {})}
    if "parent" in spec:
        out["parent"] = {**spec["parent"], "options": {**spec["parent"]["options"], **q.get("parent", {})}}
    if "finetune" in spec:
        out["finetune"] = {**spec["finetune"], **q.get("finetune", {})}
    return out


def plan(spec: dict[str, Any], quick: bool) -> list[Run]:
    """Every run of the study, in an order that respects dependencies (dense pre-runs before oneshot)."""
    spec = effective(spec, quick)
    if "finetune" in spec:
        return plan_finetune(spec)
    base = dict(spec["base"])
    grid = spec["grid"]
    epochs = base["epochs"]
    runs: list[Run] = []
    seeds, patterns = grid["seeds"], grid["patterns"]
    main_variant = main_variant_of(spec)
    for seed in grid.get("dense_seeds", seeds):
        if "dense" in grid["methods"]:
            runs.append(
                Run(
                    f"main_dense_s{seed}",
                    {**base, "method": "dense", "seed": seed},
                    {"method": "dense", "nm": None, "seed": seed, "variant": main_variant},
                )
            )
    for seed in seeds:
        if "oneshot" in grid["methods"]:
            pre = spec["oneshot"]["dense_epochs"] if not quick else max(1, epochs // 2)
            runs.append(
                Run(
                    f"pre_dense{pre}_s{seed}",
                    {**base, "method": "dense", "seed": seed, "epochs": pre},
                    {"method": "dense", "nm": None, "seed": seed, "variant": f"dense_{pre}ep_for_oneshot"},
                )
            )
    # Extra seeds for the contrast the claim is about (MaxQ vs SR-STE), beyond the seeds of the full grid.
    extra = grid.get("extra_seeds") or {}
    if set(extra.get("methods", [])) & {"dense", "oneshot"}:
        raise ValueError("grid.extra_seeds.methods may list srste and maxq only (dense and oneshot need pre-runs)")
    cells = [(seed, grid["methods"]) for seed in seeds] + [
        (s, extra.get("methods", [])) for s in extra.get("seeds", [])
    ]
    by_pattern = grid.get("seeds_by_pattern") or {}  # fewer seeds for some patterns (budget)
    # Default order: seed by seed. `order: pattern` runs every seed of the first pattern first (the contrast that
    # matters most finishes first when time is short).
    order = [(seed, methods, nm) for seed, methods in cells for nm in patterns]
    if grid.get("order") == "pattern":
        order = [(seed, methods, nm) for nm in patterns for seed, methods in cells]
    for seed, methods, nm in order:
        if nm in by_pattern and seed not in by_pattern[nm]:
            continue
        for method in methods:
            if method == "dense":
                continue
            options = {
                **base,
                "method": method,
                "nm": nm,
                "seed": seed,
                **spec.get("method_options", {}).get(method, {}),
            }
            after = []
            if method == "oneshot":
                pre = spec["oneshot"]["dense_epochs"] if not quick else max(1, epochs // 2)
                options["epochs"] = epochs - pre
                options["init"] = f"@pre_dense{pre}_s{seed}"
                after = [f"pre_dense{pre}_s{seed}"]
            runs.append(
                Run(
                    f"main_{method}_{_nm_tag(nm)}_s{seed}",
                    options,
                    {"method": method, "nm": nm, "seed": seed, "variant": main_variant},
                    after,
                )
            )
    for ab in spec.get("ablations", []):
        for nm in ab["patterns"]:
            # The first pattern gets every listed seed, the others the first seed only (budget).
            for seed in ab["seeds"] if nm == ab["patterns"][0] else ab["seeds"][:1]:
                options = {
                    **base,
                    "method": "maxq",
                    "nm": nm,
                    "seed": seed,
                    **spec.get("method_options", {}).get("maxq", {}),
                    **ab["options"],
                }
                runs.append(
                    Run(
                        f"abl_{ab['name']}_{_nm_tag(nm)}_s{seed}",
                        options,
                        {"method": "maxq", "nm": nm, "seed": seed, "variant": ab["name"]},
                    )
                )
    return runs


@dataclass
class Execution:
    """How the runs are carried out; none of it changes what a run trains."""

    jobs: int = 2  # trainings at once
    threads: int = 1  # CPU threads per training
    device: str | None = None  # `maxq train --device` (default: its own, auto)
    data_dir: str | None = None  # `maxq train --data-dir`
    runs_dir: Path | None = None  # run folders (default <results>/runs)
    deadline_s: float | None = None  # start no run that would not finish by then (seconds from the start)
    device_name: str | None = None  # the GPU's name, for the records


def _record_path(results: Path, run: Run) -> Path:
    return results / f"{run.id}.json"


def _command(run: Run, results: Path, ex: Execution) -> tuple[list[str], Path]:
    runs_dir = ex.runs_dir or results / "runs"
    folder = runs_dir / run.id
    options = dict(run.options)
    if str(options.get("init", "")).startswith("@"):
        options["init"] = str(runs_dir / options["init"][1:] / "checkpoint.pt")
    options["variant"] = run.record["variant"]
    recipe = runs_dir / f"{run.id}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({k: v for k, v in options.items() if k != "variant"}, sort_keys=False))
    cmd = [sys.executable, "-m", "maxq", "train", "--config", str(recipe), "--out", str(folder)]
    cmd += ["--threads", str(ex.threads), "--no-progress", "--variant", run.record["variant"]]
    if ex.device:
        cmd += ["--device", ex.device]
    if ex.data_dir:
        cmd += ["--data-dir", str(ex.data_dir)]
    if (folder / "checkpoint.pt").exists() and not (folder / "report.json").exists():
        cmd.append("--resume")
    return cmd, folder


def _write_record(run: Run, folder: Path, results: Path, command: list[str], ex: Execution) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    n, m = (int(x) for x in run.record["nm"].split(":")) if run.record["nm"] else (None, None)
    record = {
        "id": run.id,
        "method": run.record["method"],
        "n": n,
        "m": m,
        "seed": run.record["seed"],
        "variant": run.record["variant"],
    }
    record.update({k: v for k, v in run.record.items() if k not in record and k != "nm"})  # arm, budget, ...
    record.update({k: report.get(k) for k in RECORD_KEYS})
    record.update(epochs=report["epochs"], model=report["model"], dataset=report["dataset"])
    if report.get("before_finetune") is not None:
        record["before_finetune"] = report["before_finetune"]
    if "ramp" in report:  # the ramp the run followed, in epochs (None: its method prunes at the first step)
        record["ramp"] = report["ramp"]
    if run.record.get("role") == "parent":
        record["checkpoint_sha256"] = sha256_file(folder / "checkpoint.pt")
    init = str(run.options.get("init", ""))
    if init.startswith("@"):  # the checkpoint this run started from, as it is now (one parent for all children)
        parent = json.loads(_record_path(results, Run(init[1:], {}, {})).read_text())
        record["parent"] = {k: parent.get(k) for k in ("id", "checkpoint_sha256", "top1_last", "val_top1_last")}
        record["parent"]["checkpoint_sha256_now"] = sha256_file(folder.parent / init[1:] / "checkpoint.pt")
    record.update(device=ex.device or "auto", device_name=ex.device_name)
    record.update(command=" ".join(command), options=run.options)
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    record["curve"] = [
        {"epoch": h["epoch"], "test_top1": h["test_top1"], "val_top1": h.get("val_top1"), "time_s": h["epoch_time_s"]}
        for h in history
    ]
    _write_json(_record_path(results, run), record)
    return record


def _plain(data: Any) -> Any:
    """``data`` with NaN and infinities as ``None`` (JSON has no NaN: ``null`` reads everywhere)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class _Progress:
    """A tqdm bar where tqdm is installed, one line per finished run where it is not."""

    def __init__(self, total: int, initial: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar, self.done, self.total = None, initial, total
        else:
            self.bar = tqdm(total=total, initial=initial, desc="study runs", unit="run")

    def update(self, note: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(note)
            self.bar.update(1)
            return
        self.done += 1
        print(f"study runs {self.done}/{self.total}: {note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(runs: list[Run], results: Path, ex: Execution) -> list[str]:
    """Run what is not finished yet, ``ex.jobs`` at a time, respecting dependencies; return the failed run ids.

    ``<results>/status.json`` says at every start and end which runs are finished, running, failed or were not
    started (past ``ex.deadline_s``), with the wall time of each finished one."""
    todo = [r for r in runs if not _record_path(results, r).exists()]
    done_ids = {r.id for r in runs if _record_path(results, r).exists()}
    running: dict[str, tuple[subprocess.Popen, Run, list[str], Path, Any, float]] = {}
    failed: list[str] = []
    not_started: list[str] = []
    durations: dict[str, float] = {}
    started = time.time()
    progress = _Progress(len(runs), len(done_ids))
    env = {**os.environ, "OMP_NUM_THREADS": str(ex.threads)}
    if (ROOT / "src" / "maxq").is_dir():  # the runs train with this checkout's maxq, not another installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    (results / "logs").mkdir(parents=True, exist_ok=True)

    def status() -> None:
        _write_json(
            results / "status.json",
            {
                "planned": [r.id for r in runs],
                "finished": sorted(done_ids),
                "running": sorted(running),
                "failed": failed,
                "not_started": not_started,
                "durations_s": durations,
                "elapsed_s": round(time.time() - started, 1),
                "device": ex.device or "auto",
                "device_name": ex.device_name,
                "jobs": ex.jobs,
                "deadline_s": ex.deadline_s,
            },
        )

    status()
    while todo or running:
        for run in list(todo):
            if len(running) >= ex.jobs:
                break
            if any(dep in failed or dep in not_started for dep in run.after):
                todo.remove(run)
                (not_started if any(dep in not_started for dep in run.after) else failed).append(run.id)
                continue
            expected = max(durations.values(), default=0.0)
            if ex.deadline_s is not None and time.time() - started + expected > ex.deadline_s:
                todo.remove(run)
                not_started.append(run.id)
                print(f"run {run.id} not started: it would not finish within --deadline", file=sys.stderr)
                status()
                continue
            if all(dep in done_ids for dep in run.after):
                cmd, folder = _command(run, results, ex)
                if (folder / "report.json").exists():  # finished, but its record was never written: write it now
                    _write_record(run, folder, results, cmd, ex)
                    done_ids.add(run.id)
                    todo.remove(run)
                    progress.update(f"{run.id}: record from its finished folder")
                    status()
                    continue
                log = open(results / "logs" / f"{run.id}.log", "a")  # noqa: SIM115 - closed when the run ends
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running[run.id] = (proc, run, cmd, folder, log, time.time())
                todo.remove(run)
                status()
        time.sleep(1.0)
        for run_id, (proc, run, cmd, folder, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[run_id]
            if proc.returncode == 0:
                durations[run_id] = round(time.time() - t0, 1)
                record = _write_record(run, folder, results, cmd, ex)
                done_ids.add(run_id)
                progress.update(f"{run_id}: {record['top1_last']:.2f}%")
            else:
                failed.append(run_id)
                print(
                    f"\nrun {run_id} failed (exit {proc.returncode}); see {results / 'logs' / (run_id + '.log')}",
                    file=sys.stderr,
                )
                progress.update(f"{run_id}: failed")
            status()
    progress.close()
    return failed + not_started


# -- statistics -----------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (Numerical Recipes)."""
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > 1e-30 else 1e-30)
    h = d
    for i in range(1, 300):
        m2 = 2 * i
        aa = i * (b - i) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1 + aa / c if abs(1 + aa / c) > 1e-30 else 1e-30
        h *= d * c
        aa = -(a + i) * (qab + i) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1 + aa / c if abs(1 + aa / c) > 1e-30 else 1e-30
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-12:
            break
    return h


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    front = (
        math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
        if 0 < x < 1
        else 0.0
    )
    ibeta = front * _betacf(a, b, x) / a if x < (a + 1) / (a + b + 2) else 1 - front * _betacf(b, a, 1 - x) / b
    return min(1.0, max(0.0, ibeta if 0 < x < 1 else (1.0 if x >= 1 else 0.0)))


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test of ``a - b`` over seeds: mean gap, its standard error, t and the two-sided p-value."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"gap": mean, "se": float("nan"), "t": float("nan"), "p": float("nan"), "pairs": n}
    se = statistics.stdev(diffs) / math.sqrt(n)
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return {"gap": mean, "se": se, "t": t, "p": t_two_sided_p(t, n - 1), "pairs": n}


# -- report ---------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(records: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    main_variant = main_variant_of(spec)
    main = [r for r in records if r["variant"] == main_variant]
    patterns = spec["grid"]["patterns"]
    methods = [m for m in spec["grid"]["methods"]]
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in methods:
        for nm in ["dense"] if method == "dense" else patterns:
            rows = [r for r in main if r["method"] == method and (method == "dense" or f"{r['n']}:{r['m']}" == nm)]
            rows.sort(key=lambda r: r["seed"])
            table.setdefault(method, {})[nm] = {
                key: [r[key] for r in rows if r.get(key) is not None]
                for key in ("top1_last", "top1_best", "val_top1_last", "val_top1_best")
            } | {"seeds": [r["seed"] for r in rows]}
    gaps = {}
    for nm in patterns:
        mq = {r["seed"]: r for r in main if r["method"] == "maxq" and f"{r['n']}:{r['m']}" == nm}
        sr = {r["seed"]: r for r in main if r["method"] == "srste" and f"{r['n']}:{r['m']}" == nm}
        seeds = sorted(set(mq) & set(sr))
        gaps[nm] = {
            key: paired_test([mq[s][key] for s in seeds], [sr[s][key] for s in seeds])
            for key in ("top1_last", "top1_best", "val_top1_last")
            if seeds and all(mq[s].get(key) is not None and sr[s].get(key) is not None for s in seeds)
        }
    # Ablations: each variant's numbers, and its difference to the main MaxQ run of the same seed and pattern
    # (paired, so seed-to-seed noise that both share cancels; the variants run fewer seeds than the main grid).
    main_maxq = {(f"{r['n']}:{r['m']}", r["seed"]): r for r in main if r["method"] == "maxq"}
    ablations: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["variant"] == main_variant or r["method"] != "maxq":
            continue
        nm = f"{r['n']}:{r['m']}"
        entry = ablations.setdefault(r["variant"], {}).setdefault(
            nm,
            {"top1_last": [], "top1_best": [], "val_top1_last": [], "seeds": [], "delta_last": [], "delta_val": []},
        )
        for key in ("top1_last", "top1_best", "val_top1_last"):
            if r.get(key) is not None:
                entry[key].append(r[key])
        entry["seeds"].append(r["seed"])
        ref = main_maxq.get((nm, r["seed"]))
        if ref is not None:
            for key, delta in (("top1_last", "delta_last"), ("val_top1_last", "delta_val")):
                if r.get(key) is not None and ref.get(key) is not None:
                    entry[delta].append(r[key] - ref[key])
    return {"table": table, "gaps": gaps, "ablations": ablations}


def plot(summary: dict[str, Any], spec: dict[str, Any], path: Path) -> None:
    """Left: test top-1 vs sparsity per method. Right: MaxQ − SR-STE per pattern, every seed and the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = spec["grid"]["patterns"]
    sparsity = {nm: 100 * (1 - int(nm.split(":")[0]) / int(nm.split(":")[1])) for nm in patterns}
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for method, cells in summary["table"].items():
        if method == "dense":
            vals = cells["dense"]["top1_last"]
            if vals:
                mean = statistics.fmean(vals)
                ax.axhline(mean, color="gray", ls="--", label=f"dense ({mean:.2f})")
            continue
        xs, ys, es = [], [], []
        for nm in patterns:
            vals = cells.get(nm, {}).get("top1_last", [])
            if vals:
                xs.append(sparsity[nm])
                ys.append(statistics.fmean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set(
        xlabel="sparsity (%)  [2:4=50, 1:4=75, 1:8=87.5, 1:16=93.75]",
        ylabel="test top-1 (%)",
        title="Fashion-MNIST, last epoch (mean ± std over seeds)",
    )
    for key, label, offset, color in (("top1_last", "test", -0.6, "C2"), ("val_top1_last", "held-out val", 0.6, "C4")):
        for nm in patterns:
            mq = summary["table"].get("maxq", {}).get(nm, {})
            sr = summary["table"].get("srste", {}).get(nm, {})
            if not mq.get(key) or mq.get("seeds") != sr.get("seeds") or len(mq[key]) != len(sr[key]):
                continue
            diffs = [a - b for a, b in zip(mq[key], sr[key])]
            x = sparsity[nm] + offset
            gap_ax.scatter([x] * len(diffs), diffs, color=color, alpha=0.5, s=14)
            gap_ax.scatter(
                [x],
                [statistics.fmean(diffs)],
                color=color,
                marker="_",
                s=300,
                label=label if nm == patterns[0] else None,
            )
    gap_ax.axhline(0, color="gray", lw=1)
    gap_ax.set(
        xlabel="sparsity (%)",
        ylabel="MaxQ − SR-STE, top-1 points",
        title="MaxQ − SR-STE per seed (dots) and mean (bar)",
    )
    for a in (ax, gap_ax):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(
    summary: dict[str, Any],
    spec: dict[str, Any],
    records: list[dict[str, Any]],
    path: Path,
    plot_path: Path,
    extra: str,
) -> None:
    patterns = spec["grid"]["patterns"]
    base = spec["base"]
    lines = ["<!-- generated by benchmarks/study.py --report; edit the surrounding docs, not this block -->", ""]
    for key, title in (("top1_last", "last epoch"), ("top1_best", "best epoch")):
        lines += [
            f"**Test top-1 (%), {title}**, mean ± std over seeds:",
            "",
            "| method | " + " | ".join(patterns) + " |",
            "|---" * (len(patterns) + 1) + "|",
        ]
        for method, cells in summary["table"].items():
            seeds = sorted({s for c in cells.values() for s in c["seeds"]})
            label = f"{method} ({_seeds(len(seeds))})"
            if method == "dense":
                lines.append(
                    f"| {label} | {_mean_std(cells['dense'][key])} (all patterns) |" + " |" * (len(patterns) - 1)
                )
                continue
            lines.append(
                f"| {label} | " + " | ".join(_mean_std(cells.get(nm, {}).get(key, [])) for nm in patterns) + " |"
            )
        lines.append("")
    lines += [
        "**MaxQ − SR-STE** (paired over seeds; t-test, two-sided):",
        "",
        "| pattern | gap, last epoch | p | gap, best epoch | p | gap, held-out val | p |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(g: dict[str, Any], key: str) -> str:
        if key not in g:
            return "— | —"
        x = g[key]
        se = "" if math.isnan(x["se"]) else f" ± {x['se']:.2f}"  # one pair: no spread, no test
        return f"{x['gap']:+.2f}{se} | " + ("—" if math.isnan(x["p"]) else f"{x['p']:.3f}")

    for nm in patterns:
        g = summary["gaps"].get(nm, {})

        pairs = g.get("top1_last", {}).get("pairs", 0)
        lines.append(
            f"| {nm} ({_seeds(pairs)}) | {cell(g, 'top1_last')} | {cell(g, 'top1_best')} | {cell(g, 'val_top1_last')} |"
        )
    lines.append("")
    if summary["ablations"]:
        abl_patterns = sorted(
            {nm for v in summary["ablations"].values() for nm in v},
            key=lambda s: int(s.split(":")[1]) / int(s.split(":")[0]),
            reverse=True,
        )

        def delta(values: list[float]) -> str:
            return "—" if not values else " / ".join(f"{v:+.2f}" for v in values)

        lines += [
            "**Ablations** (MaxQ variants). Test top-1 % at the last epoch, mean over the seeds run, then the "
            "difference to the main MaxQ run with the same seed (one number per seed; test, then held-out val):",
            "",
            "| variant | " + " | ".join(f"{nm}: top-1 | {nm}: Δ test | {nm}: Δ val" for nm in abl_patterns) + " |",
            "|---" * (3 * len(abl_patterns) + 1) + "|",
        ]
        main_cells = []
        for nm in abl_patterns:
            cells = summary["table"].get("maxq", {}).get(nm, {})
            main_cells.append(f"{_mean_std(cells.get('top1_last', []))} | ref. | ref.")
        lines.append("| main (default MaxQ, all seeds) | " + " | ".join(main_cells) + " |")
        for variant, cells in summary["ablations"].items():
            row = []
            for nm in abl_patterns:
                c = cells.get(nm, {})
                row.append(
                    f"{_mean_std(c.get('top1_last', []))} | {delta(c.get('delta_last', []))} | "
                    f"{delta(c.get('delta_val', []))}"
                )
            desc = next((a.get("description", "") for a in spec.get("ablations", []) if a["name"] == variant), "")
            lines.append(f"| {variant} — {desc} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        f"![accuracy vs sparsity]({plot_path.name})",
        "",
        f"Runs: {len(records)} records in `{spec.get('results', 'results')}/`; base settings: `{json.dumps(base)}`.",
        "",
        extra,
    ]
    _replace_block(path, _tag(spec), "\n".join(lines) + "\n")


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def epoch_gaps(records: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """Per epoch, at the patterns in ``report.curves``: both methods' mean top-1 and the paired MaxQ − SR-STE gap
    (test and held-out val) over the seeds both ran, from the records' learning curves."""
    main_variant = main_variant_of(spec)
    out: dict[str, Any] = {}
    for nm in spec.get("report", {}).get("curves", []):
        runs = {
            (r["method"], r["seed"]): r["curve"]
            for r in records
            if r["variant"] == main_variant and r.get("n") and f"{r['n']}:{r['m']}" == nm and r.get("curve")
        }
        by_method = {method: {s for (m, s) in runs if m == method} for method in ("maxq", "srste")}
        seeds = sorted(by_method["maxq"] & by_method["srste"])
        if not seeds:
            continue
        epochs = min(len(runs[(method, s)]) for method in ("maxq", "srste") for s in seeds)
        rows = []
        for e in range(epochs):
            row: dict[str, Any] = {"epoch": e + 1, "seeds": len(seeds)}
            for key, label in (("test_top1", "test"), ("val_top1", "val")):
                mq = [runs[("maxq", s)][e].get(key) for s in seeds]
                sr = [runs[("srste", s)][e].get(key) for s in seeds]
                if None in mq or None in sr:
                    continue
                row[f"maxq_{label}"] = statistics.fmean(mq)
                row[f"srste_{label}"] = statistics.fmean(sr)
                row[f"gap_{label}"] = paired_test(mq, sr)
            rows.append(row)
        out[nm] = rows
    return out


def _ramp_end(spec: dict[str, Any]) -> float | None:
    ramp = spec.get("method_options", {}).get("maxq", {}).get("ramp")
    return float(ramp[1]) if ramp else None


def plot_curves(curves: dict[str, Any], spec: dict[str, Any], path: Path) -> None:
    """Per pattern: both methods' test top-1 per epoch (left) and the paired gap per epoch, test and val (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(12, 3.8 * len(curves)), squeeze=False)
    end = _ramp_end(spec)
    for (nm, rows), (ax, gap_ax) in zip(curves.items(), axes):
        epochs = [r["epoch"] for r in rows]
        for method in ("srste", "maxq"):
            ax.plot(epochs, [r.get(f"{method}_test") for r in rows], "o-", ms=3, label=f"{method} (test)")
        ax.set(xlabel="epoch", ylabel="test top-1 (%)", title=f"{nm}: mean over {_seeds(rows[0]['seeds'])}")
        for label, color in (("test", "C2"), ("val", "C4")):
            gaps = [r.get(f"gap_{label}") for r in rows]
            if None in gaps:
                continue
            means = [g["gap"] for g in gaps]
            ses = [0.0 if math.isnan(g["se"]) else g["se"] for g in gaps]
            gap_ax.errorbar(epochs, means, yerr=ses, marker="o", ms=3, capsize=2, color=color, label=label)
        gap_ax.axhline(0, color="gray", lw=1)
        gap_ax.set(xlabel="epoch", ylabel="MaxQ − SR-STE (points)", title=f"{nm}: paired gap per epoch (± s.e.)")
        for a in (ax, gap_ax):
            if end:
                a.axvspan(0.5, end + 0.5, color="gray", alpha=0.12, label="MaxQ ramp")
            a.grid(alpha=0.3)
            a.legend()
        ax.set_ylim(bottom=max(50.0, min(r.get("srste_test", 100) for r in rows) - 2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_markdown(curves: dict[str, Any], spec: dict[str, Any], plot_path: Path) -> str:
    end = _ramp_end(spec)
    lines = []
    for nm, rows in curves.items():
        lines += [
            f"**Gap per epoch at {nm}** (mean top-1 over {_seeds(rows[0]['seeds'])}, paired; MaxQ's ramp ends after "
            f"epoch {end:g}):"
            if end
            else f"**Gap per epoch at {nm}**:",
            "",
            "| epoch | SR-STE test | MaxQ test | gap, test | p | SR-STE val | MaxQ val | gap, val | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [str(r["epoch"])]
            for label in ("test", "val"):
                g = r.get(f"gap_{label}")
                if g is None:
                    cells += ["—"] * 4
                    continue
                p = "—" if math.isnan(g["p"]) else f"{g['p']:.3f}"
                se = "" if math.isnan(g["se"]) else f" ± {g['se']:.2f}"
                cells += [f"{r[f'srste_{label}']:.2f}", f"{r[f'maxq_{label}']:.2f}", f"{g['gap']:+.2f}{se}", p]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![learning curves and gap per epoch]({plot_path.name})", ""]
    return "\n".join(lines)


def compare_gaps(summary: dict[str, Any], other: dict[str, Any], spec: dict[str, Any]) -> str:
    """This study's MaxQ − SR-STE gaps next to another study's (``report.compare_with``: its summary.json)."""
    label = spec.get("report", {}).get("compare_label", "other study")
    mine = spec.get("report", {}).get("label", "this study")
    lines = [
        f"**MaxQ − SR-STE, {label} vs {mine}** (paired gap ± s.e., p; last epoch):",
        "",
        f"| pattern | test, {label} | test, {mine} | val, {label} | val, {mine} |",
        "|---|---|---|---|---|",
    ]

    def cell(g: dict[str, Any] | None) -> str:
        if not g:
            return "—"
        se = "" if math.isnan(g["se"]) else f" ± {g['se']:.2f}"
        p = "" if math.isnan(g["p"]) else f" (p {g['p']:.3f}, {g['pairs']} seeds)"
        return f"{g['gap']:+.2f}{se}{p}"

    for nm in spec["grid"]["patterns"]:
        a, b = other.get("gaps", {}).get(nm, {}), summary["gaps"].get(nm, {})
        lines.append(
            f"| {nm} | {cell(a.get('top1_last'))} | {cell(b.get('top1_last'))} | {cell(a.get('val_top1_last'))} "
            f"| {cell(b.get('val_top1_last'))} |"
        )
    return "\n".join(lines) + "\n"


NOT_RECORDS = ("summary.json", "status.json")


def report(spec: dict[str, Any], results: Path, docs: Path) -> dict[str, Any]:
    """Aggregate the records in ``results`` into ``summary.json``, the tables in ``docs/RESULTS.md`` and the plot
    (left out, with a note, where matplotlib is not installed)."""
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if p.name not in NOT_RECORDS]
    records = [r for r in records if "variant" in r and not r["variant"].startswith("dense_")]
    summary = summarize(records, spec)
    _write_json(results / "summary.json", summary)
    docs.mkdir(parents=True, exist_ok=True)
    plot_path = docs / ("study_accuracy.png" if _tag(spec) == "study" else f"{_tag(spec)}_accuracy.png")
    curves = epoch_gaps(records, spec)
    if curves:
        summary["epoch_gaps"] = curves
        _write_json(results / "summary.json", summary)
    try:
        plot(summary, spec, plot_path)
        if curves:
            plot_curves(curves, spec, plot_path.with_name(f"{_tag(spec)}_curves.png"))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    gpus = sorted({r["device_name"] for r in records if r.get("device_name")})
    if gpus:
        machine += f", {', '.join(gpus)}"
    extra = f"Machine: {machine}."
    compare = spec.get("report", {}).get("compare_with")
    if compare and (ROOT / compare).is_file():
        extra = compare_gaps(summary, json.loads((ROOT / compare).read_text()), spec) + "\n" + extra
    if curves:
        extra = curves_markdown(curves, spec, plot_path.with_name(f"{_tag(spec)}_curves.png")) + "\n" + extra
    write_markdown(summary, spec, records, docs / "RESULTS.md", plot_path, extra)
    plots = [plot_path, plot_path.with_name(f"{_tag(spec)}_curves.png")]
    summary["files"] = {
        "summary": str(results / "summary.json"),
        "tables": str(docs / "RESULTS.md"),
        "plots": [str(p) for p in plots if p.exists()],
    }
    return summary


def closing_lines(summary: dict[str, Any]) -> list[str]:
    """What the study prints at the end: the paired MaxQ - SR-STE gap per pattern, and where the files are."""
    lines = []
    for nm, metrics in summary["gaps"].items():
        g = metrics.get("top1_last")
        if not g:
            continue
        p = f"p {g['p']:.2g}" if g.get("p") is not None and math.isfinite(g["p"]) else "p n/a (one seed)"
        lines.append(
            f"MaxQ - SR-STE at {nm}: {g['gap']:+.2f} top-1 points (last epoch, {g['pairs']} seed pair(s), {p})"
        )
    files = summary.get("files", {})
    lines.append(f"tables: {files.get('tables')}")
    lines.append(f"plots:  {', '.join(files.get('plots', [])) or 'none (matplotlib not installed)'}")
    lines.append(f"summary (JSON): {files.get('summary')}")
    return lines


# -- the fine-tuning study (configs/study_finetune.yaml): sparsify a trained dense model ------------------------


def _recipe(spec: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning recipe the study measures: ``recipe`` (a ``maxq train`` YAML, e.g. configs/finetune.yaml)
    under the spec's ``base`` (data and model settings, which win)."""
    options: dict[str, Any] = {}
    if spec.get("recipe"):
        from maxq.train.recipe import load_yaml

        options = load_yaml(ROOT / spec["recipe"])
    return {**options, **spec["base"]}


def plan_finetune(spec: dict[str, Any]) -> list[Run]:
    """The parent (a dense run) first, then every arm x pattern x budget x seed fine-tuned from its checkpoint.

    An arm is a method with options; ``ramp_share`` sets the ramp of the arms that have one to the first share of
    each budget (``[0, share * budget]`` epochs). Runs are ordered seed by seed, so a study cut short has every
    cell at the first seeds."""
    parent = spec["parent"]
    runs = [Run(parent["id"], dict(parent["options"]), {"method": "dense", "nm": None, "seed": parent["options"]
                .get("seed", 0), "variant": parent.get("variant", "parent"), "role": "parent"})]  # fmt: skip
    ft = spec["finetune"]
    recipe = _recipe(spec)
    share = float(ft.get("ramp_share", 0.5))
    for seed in ft["seeds"]:
        for budget in ft["budgets"]:
            for nm in ft["patterns"]:
                for arm, arm_spec in ft["arms"].items():
                    if arm_spec.get("patterns") and nm not in arm_spec["patterns"]:
                        continue
                    method = arm_spec["method"]
                    options = {**recipe, "method": method, "nm": nm, "seed": seed, "epochs": budget}
                    options.update(arm_spec.get("options", {}))
                    options["init"] = f"@{parent['id']}"
                    if method == "maxq":
                        options["ramp"] = [0.0, round(share * budget, 3)]
                    else:  # options only MaxQ takes are left out of the other methods' recipes
                        for key in ("ramp", "per_step", "soft_warmup", "queries", "schedule", "order"):
                            options.pop(key, None)
                    runs.append(
                        Run(
                            f"ft_{arm}_{_nm_tag(nm)}_e{budget}_s{seed}",
                            options,
                            {"method": method, "nm": nm, "seed": seed, "variant": main_variant_of(spec), "arm": arm,
                             "budget": budget},
                            [parent["id"]],
                        )
                    )  # fmt: skip
    return runs


def _scratch(spec: dict[str, Any]) -> dict[tuple[str, str | None], list[dict[str, Any]]]:
    """The from-scratch records to show beside each cell (``scratch.results``: the long study's), by (method,
    pattern); dense under (dense, None)."""
    folder = spec.get("scratch", {}).get("results")
    out: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    if not folder or not (ROOT / folder).is_dir():
        return out
    variant = spec.get("scratch", {}).get("variant")
    for p in sorted((ROOT / folder).glob("*.json")):
        if p.name in NOT_RECORDS:
            continue
        r = json.loads(p.read_text())
        if "method" not in r or (variant and r.get("variant") != variant):
            continue
        nm = f"{r['n']}:{r['m']}" if r.get("n") else None
        out.setdefault((r["method"], nm), []).append(r)
    return out


def _curve_means(rows: list[dict[str, Any]], key: str) -> list[float | None]:
    """Mean over seeds of ``key`` per fine-tuning epoch, epoch 0 (before fine-tuning) first."""
    if not rows:
        return []
    length = min(len(r.get("curve", [])) for r in rows)
    means: list[float | None] = []
    before = [r.get("before_finetune", {}).get(key) for r in rows]
    means.append(statistics.fmean(before) if None not in before else None)
    for e in range(length):
        vals = [r["curve"][e].get(key) for r in rows]
        means.append(statistics.fmean(vals) if None not in vals else None)
    return means


def final_pattern_epoch(record: dict[str, Any]) -> int | None:
    """The first fine-tuning epoch after which a run is at its final N:M pattern: 0 for a method without a ramp
    (oneshot and SR-STE prune at the first step), the end of its ramp rounded up for MaxQ. ``None`` if the record
    does not say (a MaxQ record without its ramp). Before that epoch some blocks are still dense, so the run is not
    yet the N:M model a user deploys, whatever its accuracy."""
    if "ramp" in record:  # written from the run's report.json
        ramp = record["ramp"]
    else:  # older records: the ramp option the study passed (MaxQ arms always get one)
        ramp = (record.get("options") or {}).get("ramp")
        if ramp is None and record.get("method") == "maxq":
            return None
    return 0 if ramp is None else math.ceil(float(ramp[1]) - 1e-9)


def _parent_sha(record: dict[str, Any]) -> str | None:
    """The SHA-256 of the parent checkpoint a child run was recorded with."""
    return (record.get("parent") or {}).get("checkpoint_sha256_now")


def summarize_finetune(records: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """Per arm, pattern and budget: before-fine-tuning and final top-1 (test and val) over seeds, the mean curve,
    the first epoch within ``report.within`` points of the parent; the paired gaps of ``report.pairs``."""
    ft = spec["finetune"]
    within = float(spec.get("report", {}).get("within", 0.5))
    parent = next((r for r in records if r.get("role") == "parent" or r["id"] == spec["parent"]["id"]), None)
    children = [r for r in records if r.get("arm")]
    shas = {_parent_sha(r) for r in children}
    summary: dict[str, Any] = {
        "parent": None
        if parent is None
        else {k: parent.get(k) for k in ("id", "top1_last", "val_top1_last", "checkpoint_sha256", "epochs")},
        "parent_mismatch": sorted(
            r["id"] for r in children if parent and _parent_sha(r) != parent.get("checkpoint_sha256")
        ),
        "parents_seen": len(shas),
        "within": within,
        "cells": {},
        "gaps": {},
    }
    by_cell: dict[tuple[str, str, int], dict[int, dict[str, Any]]] = {}  # (arm, pattern, budget) -> seed -> record
    for r in children:
        by_cell.setdefault((r["arm"], f"{r['n']}:{r['m']}", r["budget"]), {})[r["seed"]] = r
    for arm in ft["arms"]:
        for nm in ft["patterns"]:
            for budget in ft["budgets"]:
                rows = [r for _, r in sorted(by_cell.get((arm, nm, budget), {}).items())]
                if not rows:
                    continue
                cell: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
                for key in ("top1_last", "val_top1_last", "top1_folded"):
                    cell[key] = [r[key] for r in rows if r.get(key) is not None]
                for key in ("test_top1", "val_top1"):
                    cell[f"before_{key}"] = [
                        r["before_finetune"][key] for r in rows if (r.get("before_finetune") or {}).get(key) is not None
                    ]
                    cell[f"curve_{key}"] = _curve_means(rows, key)
                starts = [final_pattern_epoch(r) for r in rows]
                cell["final_pattern_epoch"] = None if None in starts else max(starts)
                if parent is not None and cell["final_pattern_epoch"] is not None:
                    # Only epochs at the final pattern count: a MaxQ run is within reach of the parent before any
                    # step because every block is still dense, which says nothing about its N:M model.
                    for key, ref in (("test_top1", "top1_last"), ("val_top1", "val_top1_last")):
                        target = (parent.get(ref) or 0.0) - within
                        curve = cell[f"curve_{key}"]
                        hit = next(
                            (
                                e
                                for e, v in enumerate(curve)
                                if e >= cell["final_pattern_epoch"] and v is not None and v >= target
                            ),
                            None,
                        )
                        cell[f"epochs_within_{key}"] = hit
                summary["cells"].setdefault(arm, {}).setdefault(nm, {})[str(budget)] = cell
    for a, b in spec.get("report", {}).get("pairs", []):
        for nm in ft["patterns"]:
            for budget in ft["budgets"]:
                ra, rb = by_cell.get((a, nm, budget), {}), by_cell.get((b, nm, budget), {})
                seeds = sorted(set(ra) & set(rb))
                if not seeds:
                    continue
                summary["gaps"].setdefault(f"{a} - {b}", {}).setdefault(nm, {})[str(budget)] = {
                    key: paired_test([ra[s][key] for s in seeds], [rb[s][key] for s in seeds])
                    for key in ("top1_last", "val_top1_last")
                    if all(ra[s].get(key) is not None and rb[s].get(key) is not None for s in seeds)
                }
    scratch = _scratch(spec)
    summary["scratch"] = {
        f"{method}@{nm or 'dense'}": {
            "top1_last": [r["top1_last"] for r in rows],
            "val_top1_last": [r.get("val_top1_last") for r in rows if r.get("val_top1_last") is not None],
            "epochs": sorted({r.get("epochs") for r in rows}),
        }
        for (method, nm), rows in scratch.items()
    }
    summary["verdict"] = _verdict(summary, spec)
    return summary


def _verdict(summary: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Per pattern and budget, the arm with the best mean held-out val top-1 (test decides no choice), with its mean
    val and test top-1: the report's draft for the verdict."""
    out: dict[str, Any] = {}
    ft = spec["finetune"]
    for nm in ft["patterns"]:
        best = {}
        for budget in ft["budgets"]:
            scores = {
                arm: statistics.fmean(c[nm][str(budget)]["val_top1_last"])
                for arm, c in summary["cells"].items()
                if c.get(nm, {}).get(str(budget), {}).get("val_top1_last")
            }
            if scores:
                arm = max(scores, key=scores.get)
                test = summary["cells"][arm][nm][str(budget)]["top1_last"]
                best[str(budget)] = {"arm": arm, "val": scores[arm], "test": statistics.fmean(test) if test else None}
        out[nm] = best
    return out


def _arm_label(spec: dict[str, Any], arm: str) -> str:
    a = spec["finetune"]["arms"][arm]
    return f"{arm} ({a['label']})" if a.get("label") else arm


def finetune_markdown(summary: dict[str, Any], spec: dict[str, Any], records: list[dict[str, Any]], plot_path: Path
                      ) -> str:  # fmt: skip
    ft = spec["finetune"]
    budgets, patterns = ft["budgets"], ft["patterns"]
    parent = summary.get("parent") or {}
    lines = ["<!-- generated by benchmarks/study.py --report; edit the surrounding docs, not this block -->", ""]
    if parent:
        lines += [
            f"**Parent** (`{parent['id']}`, dense, {parent.get('epochs')} epochs): test top-1 "
            f"{parent.get('top1_last') or math.nan:.2f}%, held-out val {parent.get('val_top1_last') or math.nan:.2f}%; "
            f"checkpoint SHA-256 `{parent.get('checkpoint_sha256')}`.",
            "",
        ]
        if summary["parent_mismatch"]:
            lines += [f"**Warning:** runs started from another parent checkpoint: {summary['parent_mismatch']}", ""]
    scratch = summary.get("scratch", {})

    def scratch_cell(method: str | None, nm: str, key: str) -> str:
        """The long study's number beside a cell; the test column also says how many seeds it has."""
        s = scratch.get(f"{method}@{nm}") if method else None
        if not s:
            return "—"
        return f"{_mean_std(s[key])} ({_seeds(len(s[key]))})" if key == "top1_last" else _mean_std(s[key])

    lines += [
        "**Before fine-tuning** (the sparsified parent as the first forward sees it, eval mode; test / val top-1 %):",
        "",
        "| arm | " + " | ".join(patterns) + " |",
        "|---" * (len(patterns) + 1) + "|",
    ]
    for arm in ft["arms"]:
        cells = []
        for nm in patterns:
            c = summary["cells"].get(arm, {}).get(nm, {})
            test = [v for b in c.values() for v in b["before_test_top1"]]
            val = [v for b in c.values() for v in b["before_val_top1"]]
            cells.append(f"{statistics.fmean(test):.2f} / {statistics.fmean(val):.2f}" if test and val else "—")
        lines.append(f"| {_arm_label(spec, arm)} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, title in (("top1_last", "Test"), ("val_top1_last", "Held-out val")):
        lines += [
            f"**{title} top-1 (%) after fine-tuning**, last epoch, mean ± std over seeds; from scratch (20 epochs, "
            "the long study) beside it where that method was run:",
            "",
            "| arm | " + " | ".join(f"{nm}, {b} ep" for nm in patterns for b in budgets) + " | "
            + " | ".join(f"{nm}, from scratch" for nm in patterns) + " |",
            "|---" * (1 + len(patterns) * (len(budgets) + 1)) + "|",
        ]  # fmt: skip
        for arm, arm_spec in ft["arms"].items():
            c = summary["cells"].get(arm, {})
            row = [_mean_std(c.get(nm, {}).get(str(b), {}).get(key, [])) for nm in patterns for b in budgets]
            method = arm_spec.get("scratch", arm_spec["method"] if arm in ("srste", "maxq") else None)
            row += [scratch_cell(method, nm, key) for nm in patterns]
            lines.append(f"| {_arm_label(spec, arm)} | " + " | ".join(row) + " |")
        dense = scratch.get("dense@dense")
        if dense:
            lines.append(f"\nDense from scratch, 20 epochs: {_mean_std(dense[key])}.")
        lines.append("")
    within = summary["within"]
    lines += [
        f"**Fine-tuning epochs to come within {within:g} points of the parent at the final N:M pattern** (mean "
        "curve over seeds; 0 = before any step; epochs before a MaxQ ramp ends do not count, some blocks are still "
        "dense there; test / val; '>B' = not within the budget B):",
        "",
        "| arm | " + " | ".join(f"{nm}, {b} ep" for nm in patterns for b in budgets) + " |",
        "|---" * (1 + len(patterns) * len(budgets)) + "|",
    ]
    for arm in ft["arms"]:
        row = []
        for nm in patterns:
            for b in budgets:
                c = summary["cells"].get(arm, {}).get(nm, {}).get(str(b))
                if not c:
                    row.append("—")
                    continue
                t, v = c.get("epochs_within_test_top1"), c.get("epochs_within_val_top1")
                row.append(f"{t if t is not None else f'>{b}'} / {v if v is not None else f'>{b}'}")
        lines.append(f"| {_arm_label(spec, arm)} | " + " | ".join(row) + " |")
    lines.append("")
    if summary["gaps"]:
        lines += [
            "**Paired gaps** (top-1 points, mean ± s.e. over seeds, two-sided paired t-test; test, then held-out val):",
            "",
            "| pair | pattern | budget | test gap | p | val gap | p |",
            "|---|---|---|---|---|---|---|",
        ]

        def cell(g: dict[str, Any] | None) -> str:
            if not g:
                return "— | —"
            se = "" if math.isnan(g["se"]) else f" ± {g['se']:.2f}"
            return f"{g['gap']:+.2f}{se} | " + ("—" if math.isnan(g["p"]) else f"{g['p']:.3f}")

        for pair, by_nm in summary["gaps"].items():
            for nm, by_b in by_nm.items():
                for b, g in by_b.items():
                    pairs = g.get("top1_last", {}).get("pairs", 0)
                    lines.append(
                        f"| {pair} | {nm} | {b} ep ({_seeds(pairs)}) | {cell(g.get('top1_last'))} | "
                        f"{cell(g.get('val_top1_last'))} |"
                    )
        lines.append("")
    verdict = summary["verdict"]
    if verdict:
        lines += ["**Best arm by held-out val** (per pattern and budget; the report's draft for the verdict):", ""]
        for nm, by_b in verdict.items():
            parts = [
                f"{b} epochs: {v['arm']} (val {v['val']:.2f}%, test {v['test']:.2f}%)"
                for b, v in by_b.items()
                if v.get("test") is not None
            ]
            lines.append(f"* {nm}: " + "; ".join(parts))
        lines.append("")
    lines += [
        f"![top-1 against fine-tuning epochs]({plot_path.name})",
        "",
        f"Runs: {len(records)} records in `{spec.get('results', 'results')}/`; recipe `{spec.get('recipe')}` under "
        f"`{json.dumps(spec['base'])}`; ramp over the first {float(ft.get('ramp_share', 0.5)):.0%} of each budget.",
    ]
    return "\n".join(lines) + "\n"


def plot_finetune(summary: dict[str, Any], spec: dict[str, Any], path: Path) -> None:
    """Rows: patterns; columns: budgets. Mean test top-1 per fine-tuning epoch (0 = before any step) per arm, with
    the parent, the parent minus ``within``, and the from-scratch 20-epoch numbers as horizontal lines, and the end
    of the MaxQ arms' ramp as a vertical one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = spec["finetune"]
    patterns, budgets = ft["patterns"], ft["budgets"]
    fig, axes = plt.subplots(len(patterns), len(budgets), figsize=(6 * len(budgets), 4 * len(patterns)),
                             squeeze=False)  # fmt: skip
    parent = (summary.get("parent") or {}).get("top1_last")
    for nm, row in zip(patterns, axes):
        for ax, b in zip(row, budgets):
            lows, ramp_ends = [], set()
            for i, arm in enumerate(ft["arms"]):
                c = summary["cells"].get(arm, {}).get(nm, {}).get(str(b))
                if not c:
                    continue
                if c.get("final_pattern_epoch"):
                    ramp_ends.add(c["final_pattern_epoch"])
                curve = c["curve_test_top1"]
                xs = [e for e, v in enumerate(curve) if v is not None]
                ys = [v for v in curve if v is not None]
                ax.plot(xs, ys, "o-", ms=3, color=f"C{i}", label=f"{arm} ({len(c['seeds'])})")
                lows += ys[1:] or ys
            for end in sorted(ramp_ends):  # left of it, MaxQ arms still have dense blocks
                ax.axvline(end, color="0.6", lw=1, ls="-.", label=f"MaxQ ramp ends (epoch {end})")
            if parent is not None:
                ax.axhline(parent, color="k", lw=1, label=f"parent ({parent:.2f})")
                ax.axhline(parent - summary["within"], color="k", lw=1, ls=":", label=f"parent − {summary['within']:g}")
            for j, method in enumerate(("srste", "maxq")):
                s = summary.get("scratch", {}).get(f"{method}@{nm}")
                if s and s["top1_last"]:
                    mean = statistics.fmean(s["top1_last"])
                    ax.axhline(mean, color=f"C{j + 6}", lw=1, ls="--", label=f"{method} from scratch ({mean:.2f})")
            floor = min(lows + ([parent - 3] if parent else []), default=0)
            ax.set_ylim(bottom=max(0.0, floor - 1))
            ax.set(xlabel="fine-tuning epoch (0 = before any step)", ylabel="test top-1 (%)",
                   title=f"{nm}, {b} fine-tuning epochs (mean over seeds)")  # fmt: skip
            ax.set_xticks(range(b + 1))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_finetune(spec: dict[str, Any], results: Path, docs: Path) -> dict[str, Any]:
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if p.name not in NOT_RECORDS]
    records = [r for r in records if "variant" in r and "id" in r]
    summary = summarize_finetune(records, spec)
    _write_json(results / "summary.json", summary)
    docs.mkdir(parents=True, exist_ok=True)
    plot_path = docs / f"{_tag(spec)}_curves.png"
    try:
        plot_finetune(summary, spec, plot_path)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    block = finetune_markdown(summary, spec, records, plot_path)
    _replace_block(docs / "RESULTS.md", _tag(spec), block)
    return summary


def _replace_block(path: Path, tag: str, block: str) -> None:
    """Put ``block`` between ``<!-- tag:begin -->`` and ``<!-- tag:end -->`` of ``path`` (appended if missing)."""
    start, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else f"# Results\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{block}{end}{tail}")


def _folder(spec: dict[str, Any], key: str, default: str) -> Path:
    return ROOT / spec.get(key, default)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "study.yaml")
    ap.add_argument("--quick", action="store_true", help="tiny grid for smoke tests (<results>/quick)")
    ap.add_argument("--results", type=Path, help="where records go (default: the spec's results, or results/)")
    ap.add_argument("--runs-dir", type=Path, help="run folders: checkpoints, models (default <results>/runs)")
    ap.add_argument("--docs", type=Path, help="where --report writes RESULTS.md (default: the spec's docs_dir, docs/)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per training")
    ap.add_argument("--device", help="maxq train --device for every run (e.g. cuda; several jobs share one GPU)")
    ap.add_argument("--data-dir", help="maxq train --data-dir for every run")
    ap.add_argument("--deadline", type=float, metavar="S", help="start no run that would not finish within S seconds")
    ap.add_argument("--only", choices=["main", "ablations"], help="run only this part")
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs into tables and the plot")
    ap.add_argument("--list", action="store_true", help="print the planned runs and exit")
    args = ap.parse_args(argv)
    spec = yaml.safe_load(args.config.read_text())
    results = args.results or _folder(spec, "results", "results") / ("quick" if args.quick else "")
    results.mkdir(parents=True, exist_ok=True)
    runs = plan(spec, args.quick)
    if args.only:
        keep = {
            r.id
            for r in runs
            if (r.record["variant"] != main_variant_of(spec)) == (args.only == "ablations") or r.id.startswith("pre_")
        }
        runs = [r for r in runs if r.id in keep]
    if args.list:
        for r in runs:
            print(r.id, json.dumps(r.options))
        return 0
    missing: list[str] = []
    if not args.report:
        ex = Execution(args.jobs, args.threads, args.device, args.data_dir, args.runs_dir, args.deadline)
        if args.device and args.device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                ex.device_name = torch.cuda.get_device_name(torch.device(args.device))
        missing = execute(runs, results, ex)
    # A quick study reports next to its records, never into the real docs.
    docs = results if args.quick else (args.docs or _folder(spec, "docs_dir", "docs"))
    spec_now = effective(spec, args.quick)
    if "finetune" in spec:
        summary = report_finetune(spec_now, results, docs)
        print(json.dumps(_plain(summary.get("verdict")), indent=1))
        print(f"tables: {docs / 'RESULTS.md'}\nsummary (JSON): {results / 'summary.json'}")
    else:
        print("\n".join(closing_lines(report(spec_now, results, docs))))
    if missing:
        print(f"{len(missing)} run(s) failed or not started: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
