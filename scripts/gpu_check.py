"""The Python half of ``scripts/gpu_check.sh`` (standard library only, so it runs wherever Python does).

    python scripts/gpu_check.py env OUT [--device cuda] [--data-dir DIR] [--dry-run]   # env.json
    python scripts/gpu_check.py require OUT STAGE MODULE...   # exit 3 and STAGE.json "skipped: no X" if one is missing
    python scripts/gpu_check.py checks RESULTS.jsonl [--only NAME]  # the CUDA checks without pytest
    python scripts/gpu_check.py finalize OUT [--final]         # stage JSON + OUT/summary.md; 4: a stage failed

``finalize`` reads ``OUT/stages.tsv`` (one line per finished stage: name, exit code, wall seconds, budget seconds,
written by the shell script), adds that to each stage's JSON under ``"stage"`` and renders ``OUT/summary.md``. It
runs after every stage, so a run cut short still leaves a summary of what finished.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "env": "0. Environment",
    "correctness": "1. Correctness on CUDA",
    "train_cost": "2. Training cost",
    "accelerate": "3. 2:4 acceleration",
    "study": "4. Accuracy study",
    "fsdp": "5. Callbacks under FSDP2",
    "memory": "6. Training memory",
}
PACKAGES = {  # import name -> distribution name
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "yaml": "PyYAML",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "safetensors": "safetensors",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
    "timm": "timm",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "triton": "triton",
    "lightning": "lightning",
    "transformers": "transformers",
    "accelerate": "accelerate",
}
FMNIST_FILES = [
    f"{stem}-ubyte.gz" for stem in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
]
STUDY_RESULTS = Path("results") / "gpu"  # under OUT: the GPU study's records, as they go into the repository


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- env ----------------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(PACKAGES.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "present"


def environment(device: str, data_dir: str | None, dry_run: bool) -> dict[str, Any]:
    """What ran where: Python, torch, CUDA, the card, optional packages, the data and the maxq source tree."""
    info: dict[str, Any] = {
        "dry_run": dry_run,
        "device_asked": device,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
    }
    if data_dir:
        folder = Path(data_dir)
        info["data_dir"] = str(folder)
        info["data_files_missing"] = [f for f in FMNIST_FILES if not (folder / f).is_file()]
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    except Exception as exc:  # report, do not crash: the summary says what is wrong
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import maxq

        source = Path(maxq.__file__).resolve()
        info["maxq"] = {"version": maxq.__version__, "file": str(source)}
        info["maxq"]["from_this_tree"] = (ROOT / "src") in source.parents
    except Exception as exc:
        info["maxq_error"] = f"{type(exc).__name__}: {exc}"
    return info


def cmd_env(args: argparse.Namespace) -> int:
    info = environment(args.device, args.data_dir, args.dry_run)
    _write_json(args.out / "env.json", info)
    problems = [k for k in ("torch_error", "maxq_error") if k in info]
    if args.device == "cuda" and not info.get("cuda_available"):
        problems.append("no CUDA")
    if info.get("maxq", {}).get("from_this_tree") is False:
        problems.append(f"maxq imported from {info['maxq']['file']}, not {ROOT / 'src'}")
    for p in problems:
        print(f"env: {p}", file=sys.stderr)
    print(json.dumps(info, indent=2, default=str))
    return 1 if problems else 0


def cmd_require(args: argparse.Namespace) -> int:
    missing = [m for m in args.modules if m != "cuda" and importlib.util.find_spec(m) is None]
    if "cuda" in args.modules and not missing:
        env = _read_json(args.out / "env.json") or {}  # the env stage asked torch already (importing it takes s)
        available = env.get("cuda_available")
        if available is None:
            import torch

            available = torch.cuda.is_available()
        if not available:
            missing.append("CUDA")
    if not missing:
        return 0
    _write_json(args.out / f"{args.stage}.json", {"status": "skipped", "reason": f"no {', '.join(missing)}"})
    print(f"{args.stage}: skipped: no {', '.join(missing)}", file=sys.stderr)
    return 3


# -- the checks without pytest -------------------------------------------------------------------------------------


def cmd_checks(args: argparse.Namespace) -> int:
    """Run tests/gpu/checks.py's checks one by one, one JSON line each (the format of the pytest hook)."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGTERM, chain=True)
    sys.path.insert(0, str(ROOT))
    from tests.gpu import checks

    def record(name: str, outcome: str, seconds: float, message: str = "", properties: Any = None) -> None:
        entry = {"test": f"tests/gpu/checks.py::{name}", "outcome": outcome, "duration_s": round(seconds, 3)}
        entry.update(message=message, properties=properties or {})
        with open(args.results, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        print(f"{outcome:8s} {name} ({seconds:.1f} s) {message.splitlines()[0] if message else ''}", flush=True)

    try:
        device = checks.target_device()
    except checks.SkipCheck as exc:
        record("device", "skipped", 0.0, str(exc))
        return 0
    failed = 0
    for check in checks.CHECKS:
        name = check.__name__
        if args.only and name.removeprefix("check_") not in args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            info = check(device)
        except checks.SkipCheck as exc:
            record(name, "skipped", time.perf_counter() - start, str(exc))
        except Exception:
            failed += 1
            lines = traceback.format_exc().splitlines()
            record(name, "failed", time.perf_counter() - start, "\n".join(lines[-25:]))
        else:
            record(name, "passed", time.perf_counter() - start, "", info)
    return 1 if failed else 0


# -- finalize: stage JSON and summary.md ----------------------------------------------------------------------------


def _stage_meta(out: Path) -> dict[str, dict[str, Any]]:
    meta: dict[str, dict[str, Any]] = {}
    path = out / "stages.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                name, rc, wall, budget = parts[:4]
                meta[name] = {
                    "exit_code": int(rc) if rc.lstrip("-").isdigit() else rc,
                    "wall_s": float(wall),
                    "budget_s": float(budget),
                }
    return meta


def _correctness(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    tests = []
    path = out / "correctness.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                tests.append(json.loads(line))
            except ValueError:
                continue
    counts: dict[str, int] = {}
    for t in tests:
        key = t["outcome"].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    return {**data, "tests": tests, "counts": counts}


def _study(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    results = out / STUDY_RESULTS
    status = _read_json(results / "status.json") or {}
    records = []
    for p in sorted(results.glob("*.json")):
        r = _read_json(p)
        if not isinstance(r, dict) or "variant" not in r:
            continue
        times = [c.get("time_s") for c in r.get("curve", []) if c.get("time_s") is not None]
        records.append(
            {
                "id": r["id"],
                "method": r["method"],
                "nm": f"{r['n']}:{r['m']}" if r.get("n") else None,
                "seed": r["seed"],
                "epochs": r.get("epochs"),
                "top1_last": r.get("top1_last"),
                "val_top1_last": r.get("val_top1_last"),
                "nm_ok": r.get("nm_ok"),
                "train_time_s": r.get("train_time_s"),
                "epoch_time_s": statistics.median(times) if times else None,
                "model": r.get("model"),
                "dataset": r.get("dataset"),
            }
        )
    summary = _read_json(results / "summary.json") or {}
    return {**data, "results_dir": str(results), "status": status, "records": records, "gaps": summary.get("gaps")}


def _status(name: str, meta: dict[str, Any] | None, data: dict[str, Any], final: bool) -> str:
    if meta is None:
        return "not run" if final else "pending"
    rc = meta["exit_code"]
    if rc == "skip" or data.get("status") == "skipped":
        return f"skipped: {data.get('reason', '?')}"
    if rc in (124, 137):
        return f"timeout after {meta['budget_s']:.0f} s"
    if name == "correctness":
        counts = data.get("counts", {})
        if counts.get("failed") or counts.get("error"):
            return f"failed: {counts.get('failed', 0) + counts.get('error', 0)} test(s)"
        if rc == 0 and not counts.get("passed"):
            return "failed: no test passed"
    if name == "study":
        status = data.get("status", {})
        planned, done = status.get("planned", []), len(data.get("records", []))
        if status.get("failed"):
            return f"failed: {len(status['failed'])} run(s)"
        if planned and 0 < done < len(planned) and rc in (0, 1):  # the deadline left some runs out
            return f"partial: {done} of {len(planned)} runs"
    return "passed" if rc == 0 else f"failed (exit {rc})"


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_env(env: dict[str, Any]) -> list[str]:
    gpus = env.get("gpus") or []
    card = "; ".join(f"{g['name']} (compute {g['capability']}, {g['memory_gib']} GiB)" for g in gpus)
    maxq_info = env.get("maxq", {})
    source = maxq_info.get("file", env.get("maxq_error", "?"))
    packages = env.get("packages", {})
    missing = [k for k, v in packages.items() if v is None]
    return [
        "| | |",
        "|---|---|",
        f"| card | {_cell(card or 'no CUDA device')} |",
        f"| nvidia-smi | {_cell(env.get('nvidia_smi', '–'))} |",
        f"| torch / CUDA / cuDNN | {env.get('torch', env.get('torch_error', '?'))} / {env.get('cuda')} / "
        f"{env.get('cudnn')} |",
        f"| Python | {env.get('python')} ({_cell(env.get('executable'))}), {env.get('cpus')} CPUs |",
        f"| maxq | {maxq_info.get('version', '?')} from {_cell(source)} |",
        f"| packages missing | {', '.join(missing) or 'none'} |",
        f"| data | {_cell(env.get('data_dir', '–'))}"
        + (f" (missing: {', '.join(env['data_files_missing'])})" if env.get("data_files_missing") else "")
        + " |",
    ]


def _render_correctness(data: dict[str, Any]) -> list[str]:
    lines = ["| test | outcome | s | notes |", "|---|---|---|---|"]
    for t in data.get("tests", []):
        note = t.get("message", "").strip().splitlines()
        note = note[-1] if note and t["outcome"] != "skipped" else (note[0] if note else "")
        props = t.get("properties") or {}
        if not note and props:
            note = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in props.items())
        name = t["test"].split("::")[-1]
        lines.append(f"| {name} | {t['outcome']} | {_fmt(t.get('duration_s'), '.1f')} | {_cell(note[:300])} |")
    if len(lines) == 2:
        lines.append("| (no test result recorded) | | | |")
    return lines


def _render_train_cost(data: dict[str, Any]) -> list[str]:
    lines = []
    for model, entry in data.get("models", {}).items():
        lines += [
            f"**{model}**, {entry.get('image')}x{entry.get('image')}, batch {entry.get('batch')}, "
            f"{_fmt(entry.get('params'))} parameters:",
            "",
            "| variant | mode | step ms | x dense | mask update ms | peak MB | compile s | host syncs step / mask |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in entry.get("rows", {}).values():
            syncs = f"{row['host_syncs_step']} / {row['host_syncs_mask_update']}" if "host_syncs_step" in row else "–"
            lines.append(
                f"| {row['variant']} | {row['mode']} | {_fmt(row.get('step_ms'))} | "
                f"{_fmt(row.get('ratio_to_dense'), '.3f')} | {_fmt(row.get('mask_update_ms'))} | "
                f"{_fmt(row.get('peak_mb'), '.0f')} | {_fmt(row.get('compile_s'), '.1f')} | {syncs} |"
            )
        for key, why in {**entry.get("skipped", {}), **entry.get("errors", {})}.items():
            lines.append(f"| {key} | | {_cell(why)} | | | | | |")
        goal = [
            f"{mode} {entry['rows'][f'maxq/{mode}']['ratio_to_dense']:.3f}"
            for mode in ("eager", "compiled")
            if "ratio_to_dense" in entry.get("rows", {}).get(f"maxq/{mode}", {})
        ]
        if goal:
            lines += ["", f"MaxQ after the ramp / dense: {', '.join(goal)} (goal <= 1.10)."]
        lines.append("")
    if not lines:
        lines.append("(nothing measured)")
    return lines


def _render_accelerate(data: dict[str, Any]) -> list[str]:
    lines = [
        "| model | input | layers sparse / candidates | dense ms | accelerated ms | speedup | output cosine "
        "| top-1 agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in data.get("models", {}).items():
        rows = entry.get("layers", {}).get("rows", [])
        e2e = entry.get("end_to_end_ms", {})
        lines.append(
            f"| {model} | {'x'.join(map(str, entry.get('input', [])))} | {entry.get('layers', {}).get('swapped', 0)} / "
            f"{len(rows)} | {_fmt(e2e.get('dense'))} | {_fmt(e2e.get('accelerated'))} | "
            f"{_fmt(e2e.get('speedup'), '.3f')} | {_fmt(entry.get('output_cosine'), '.5f')} | "
            f"{_fmt(entry.get('top1_agreement'), '.3f')} |"
        )
    for model, why in data.get("errors", {}).items():
        lines.append(f"| {model} | error: {_cell(why)} | | | | | | |")
    return lines


def _render_study(data: dict[str, Any]) -> list[str]:
    status = data.get("status", {})
    lines = [
        "| run | method | N:M | seed | epochs | test top-1 | val top-1 | N:M ok | train s | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.get("records", []):
        lines.append(
            f"| {r['id']} | {r['method']} | {r['nm']} | {r['seed']} | {r['epochs']} | {_fmt(r['top1_last'])} | "
            f"{_fmt(r['val_top1_last'])} | {r['nm_ok']} | {_fmt(r['train_time_s'], '.0f')} | "
            f"{_fmt(r['epoch_time_s'], '.1f')} |"
        )
    for key in ("running", "failed", "not_started"):
        if status.get(key):
            lines.append(f"| {key.replace('_', ' ')}: {', '.join(status[key])} | | | | | | | | | |")
    gaps = data.get("gaps") or {}
    rows = [(nm, g["top1_last"], g.get("val_top1_last")) for nm, g in gaps.items() if g.get("top1_last")]
    if rows:
        lines += ["", "MaxQ − SR-STE (paired over seeds):", "", "| N:M | seeds | test gap | p | val gap | p |"]
        lines.append("|---|---|---|---|---|---|")
        for nm, test, val in rows:
            val = val or {}
            lines.append(
                f"| {nm} | {test['pairs']} | {test['gap']:+.2f} ± {_fmt(test['se'])} | {_fmt(test['p'], '.3f')} | "
                f"{_fmt(val.get('gap'), '+.2f')} | {_fmt(val.get('p'), '.3f')} |"
            )
    lines += ["", f"Records: `{data.get('results_dir')}` (copy them into the repository's `results/gpu/`)."]
    return lines


def _render_fsdp(data: dict[str, Any]) -> list[str]:
    """One row per run of scripts/gpu_fsdp_check.py: N:M after the fold, the checkpoint state, the resume."""
    lines = [
        "| part | run | status | N:M after fold | checkpoint state whole | resumed = uninterrupted (max diff) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, entry in data.get("parts", {}).items():
        runs = {"": entry} if "full_state_dict_nm" in entry else {}
        runs.update({k: v for k, v in entry.items() if k in ("llama", "gpt2")})
        if "rehearsal" in entry:
            runs["gpt2, hooks by hand (rehearsal)"] = entry["rehearsal"].get("gpt2_hooks_by_hand", {})
        if not runs:
            runs = {"": entry}
        for name, run in runs.items():
            nm = run.get("full_state_dict_nm", {})
            saved = run.get("saved_model_nm")
            nm_cell = _fmt(nm.get("ok")) + (f", saved {saved['ok']}" if saved else "")
            whole = run.get("checkpoint_state_whole", run.get("state_file_whole"))
            resumed = run.get("resumed_vs_uninterrupted")
            resumed_cell = (
                f"{resumed['same_zeros'] and resumed['same_keys']} ({_fmt(resumed['max_abs_diff'], '.2g')})"
                if resumed
                else "–"
            )
            status = run.get("status", entry.get("status", "?"))
            if status == "failed" and run.get("error"):
                status = f"failed: {run['error'].strip().splitlines()[-1]}"
            lines.append(
                f"| {part} | {name or '–'} | {_cell(status[:200])} | {nm_cell} | {_fmt(whole)} | {resumed_cell} | "
                f"{_fmt(run.get('seconds', entry.get('wall_s') if run is entry else None), '.1f')} |"
            )
        for problem in entry.get("problems", []):
            lines.append(f"| {part} | problem | {_cell(problem[:300])} | | | | |")
    return lines


def _render_memory(data: dict[str, Any]) -> list[str]:
    lines = [f"Figure: {data.get('figure', '?')}{' (tiny sizes)' if data.get('tiny') else ''}.", ""]
    lines += [
        "| model | dtype | optimizer | method | peak MiB | extra MiB | x weights | x sparsified | masks x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.get("rows", []):
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['optimizer']} | {r['method']} | {_fmt(r.get('peak_mib'), '.0f')} | "
            f"{_fmt(r.get('extra_mib'), '.1f')} | {_fmt(r.get('x_weights'), '.3f')} | "
            f"{_fmt(r.get('x_sparsified'), '.3f')} | {_fmt(r.get('mask_x'), '.4f')} |"
        )
    if len(lines) == 4:
        lines.append("| (nothing measured) | | | | | | | | |")
    return lines


RENDER = {
    "correctness": _render_correctness,
    "train_cost": _render_train_cost,
    "accelerate": _render_accelerate,
    "study": _render_study,
    "fsdp": _render_fsdp,
    "memory": _render_memory,
}


def finalize(out: Path, final: bool) -> str:
    """Add each stage's exit code, wall time and budget to its JSON and write ``OUT/summary.md``; returns it."""
    meta = _stage_meta(out)
    run = _read_json(out / "run.json") or {}
    env = _read_json(out / "env.json") or {}
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        data = _read_json(out / f"{name}.json")
        data = data if isinstance(data, dict) else {}
        if name == "correctness":
            data = _correctness(out, data)
        elif name == "study":
            data = _study(out, data)
        data["stage"] = {**(meta.get(name) or {}), "status": _status(name, meta.get(name), data, final)}
        if name in meta or (out / f"{name}.json").exists():
            _write_json(out / f"{name}.json", data)
        stages[name] = data
    mode = "dry run on the CPU (tiny sizes: the timings mean nothing)" if run.get("dry_run") else "GPU run"
    used = sum(m["wall_s"] for m in meta.values())
    budget = sum(run.get("budgets", {}).values())
    lines = [
        "# maxq GPU check",
        "",
        f"Mode: **{mode}**. Started {run.get('started', '?')}; stages took {used:.0f} s of {budget:.0f} s of budgets"
        f"{'' if final else ' (still running)'}. Command: `{run.get('command', '?')}`.",
        "",
        *_render_env(env),
        "",
        "## Stages",
        "",
        "| stage | status | exit | wall s | budget s | JSON | log |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, title in STAGES.items():
        m, st = meta.get(name, {}), stages[name]["stage"]
        budget_s = m.get("budget_s", run.get("budgets", {}).get(name))
        lines.append(
            f"| {title} | {_cell(st['status'])} | {_fmt(m.get('exit_code'))} | {_fmt(m.get('wall_s'), '.1f')} | "
            f"{_fmt(budget_s, '.0f')} | {name}.json | {name}.log |"
        )
    for name, render in RENDER.items():
        lines += ["", f"## {STAGES[name]}", ""]
        try:
            lines += render(stages[name])
        except Exception as exc:  # a malformed stage JSON must not cost the rest of the summary
            lines.append(f"(could not render: {type(exc).__name__}: {exc})")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def cmd_finalize(args: argparse.Namespace) -> int:
    """Exit 0 if every stage so far passed, was skipped or (the study) stopped at its deadline; else 4."""
    finalize(args.out, args.final)
    statuses = [(_read_json(args.out / f"{name}.json") or {}).get("stage", {}).get("status", "") for name in STAGES]
    bad = [s for s in statuses if s and not s.startswith(("passed", "skipped", "pending", "partial"))]
    return 4 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="write OUT/env.json")
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("require", help="exit 3 (and mark the stage skipped) if a module or CUDA is missing")
    p.add_argument("out", type=Path)
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("modules", nargs="+", help="import names, or cuda")
    p.set_defaults(func=cmd_require)
    p = sub.add_parser("checks", help="run tests/gpu/checks.py without pytest")
    p.add_argument("results", type=Path, help="JSON-lines file to append to")
    p.add_argument("--only", nargs="*", help="check names (without check_)")
    p.set_defaults(func=cmd_checks)
    p = sub.add_parser("finalize", help="stage JSON and OUT/summary.md")
    p.add_argument("out", type=Path)
    p.add_argument("--final", action="store_true", help="stages that did not run are 'not run', not 'pending'")
    p.set_defaults(func=cmd_finalize)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
