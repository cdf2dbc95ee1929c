"""scripts/gpu_check.sh: the dry run (every stage on the CPU, tiny sizes) and the summary logic on made-up stages.

The dry run is what makes the real GPU run safe: a typo, a missing import or a wrong path in any stage fails here,
on the CPU, instead of costing the few minutes of a lent GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)
FMNIST = Path("/usr/share/datasets/fashion-mnist")
# One xdist worker runs this file: its dry run (a minute) is a module fixture, made once.
pytestmark = pytest.mark.xdist_group("gpu_check")
CHECK_NAMES = {
    "masks_match_cpu",
    "bf16_channels_last_training",
    "compiled_equals_eager",
    "training_step_has_no_host_sync",
    "accelerate",
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the dry run's study stage needs Fashion-MNIST in {FMNIST} (make data)")
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "PY": sys.executable}
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run", "--data-dir", str(FMNIST)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    return out, proc, time.perf_counter() - start


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_writes_a_complete_summary(dry_run):
    out, proc, wall = dry_run
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert summary in proc.stdout  # the command ends by printing it
    assert "Mode: **dry run on the CPU" in summary and "| torch / CUDA / cuDNN |" in summary
    for name, title in gpu_check.STAGES.items():
        data = json.loads((out / f"{name}.json").read_text())
        stage = data["stage"]
        assert stage["status"] == "passed", f"{name}: {stage}\n{(out / f'{name}.log').read_text()[-3000:]}"
        assert stage["exit_code"] == 0 and 0 < stage["wall_s"] <= stage["budget_s"]
        assert f"| {title} | passed | 0 |" in summary
        assert f"## {title}" in summary or name == "env"
    budgets = json.loads((out / "run.json").read_text())["budgets"]
    assert sum(budgets.values()) <= 330 and wall < 300  # the stage budgets bound the dry run


@pytest.mark.slow
def test_dry_run_stage_json_holds_the_measurements(dry_run):
    out, _, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] and env["maxq"]["from_this_tree"] and env["packages"]["torch"]
    assert env["data_files_missing"] == []

    correctness = json.loads((out / "correctness.json").read_text())
    outcomes = {t["test"].split("::")[-1].removeprefix("test_"): t["outcome"] for t in correctness["tests"]}
    assert set(outcomes) >= CHECK_NAMES, outcomes
    assert all(outcomes[n] in ("passed", "skipped") for n in CHECK_NAMES), outcomes
    assert outcomes["masks_match_cpu"] == outcomes["bf16_channels_last_training"] == "passed"
    masks = next(t for t in correctness["tests"] if t["test"].endswith("test_masks_match_cpu"))
    cases = masks["properties"]["cases"]
    assert "srste 1:16 (kept-index codes)" in cases and len(cases) == 6
    assert masks["properties"]["layer_masks_compared"] == 3 * len(cases) * 2  # 3 ResNet-50 layers x (set, stepped)

    cost = json.loads((out / "train_cost.json").read_text())
    assert set(cost["models"]) == {"cnn_small"}
    for entry in cost["models"].values():
        rows = entry["rows"]
        assert {f"{v}/eager" for v in ("dense", "srste", "maxq", "maxq_ramp")} <= set(rows), entry
        assert rows["dense/eager"]["ratio_to_dense"] == 1.0
        assert all(r["step_ms"] > 0 and r["mask_update_ms"] >= 0 for k, r in rows.items() if k.endswith("eager"))
        assert entry["errors"] == {}
        for key in ("dense/compiled", "maxq/compiled"):  # measured, or left out for the budget (and said so)
            assert rows.get(key, {}).get("compile_s", 0) > 0 or entry["skipped"][key].startswith("budget"), entry

    accel = json.loads((out / "accelerate.json").read_text())
    rows = accel["models"]["resnet50"]["layers"]["rows"]
    assert accel["errors"] == {} and len(rows) == 34 and all(r["input_shape"] for r in rows)

    study = json.loads((out / "study.json").read_text())
    (record,) = study["records"]
    assert (record["method"], record["nm"], record["nm_ok"], record["dataset"]) == (
        "maxq",
        "1:16",
        True,
        "fashion-mnist-32",
    )
    assert study["status"]["planned"] == ["main_maxq_1-16_s0"] and study["status"]["device"] == "cpu"
    assert (out / "results" / "gpu" / "main_maxq_1-16_s0.json").exists()  # the record, where it travels back

    fsdp = json.loads((out / "fsdp.json").read_text())
    assert fsdp["ok"] and fsdp["dry_run"] and set(fsdp["parts"]) == {"lightning", "hf"}
    lightning = fsdp["parts"]["lightning"]  # ModelParallelStrategy runs on the CPU (gloo): all of it rehearsed
    assert lightning["status"] == "passed" and lightning["problems"] == [], lightning
    assert lightning["weights_sharded"] == "DTensor" and lightning["full_state_dict_nm"]["ok"]
    assert lightning["callback_check_ok"] and lightning["checkpoint_state_whole"] and not lightning["unfolded_keys"]
    assert lightning["checkpoint_layout"]["layers"] == lightning["layers"] == ["net.0", "net.3"]
    assert lightning["resumed_vs_uninterrupted"] == {"same_keys": True, "same_zeros": True, "max_abs_diff": 0.0}
    hf = fsdp["parts"]["hf"]
    assert hf["llama"] == hf["gpt2"] == {"status": "skipped: needs CUDA"}  # the Trainer's FSDP2 needs CUDA
    by_hand = hf["rehearsal"]["gpt2_hooks_by_hand"]
    assert by_hand["weights_sharded"] == "DTensor" and by_hand["callback_check_ok"]
    assert by_hand["full_state_dict_nm"]["ok"] and by_hand["full_state_dict_nm"]["layers"] == 8
    assert hf["rehearsal"]["arguments"]["fsdp_config"]["version"] == 2

    memory = json.loads((out / "memory.json").read_text())
    assert memory["tiny"] and memory["figure"].startswith("peak RSS of one process")
    cells = {(r["model"], r["dtype"], r["method"]) for r in memory["rows"]}
    assert cells == {(m, d, k) for m in ("linear8", "resnet50", "gpt2") for d in ("fp32", "bf16")
                     for k in ("dense", "maxq")}  # fmt: skip
    assert all(r["mask_bytes"] > 0 for r in memory["records"] if r["method"] == "maxq")


# -- the summary logic, on made-up stage results (no torch, fast) ---------------------------------------------------


def _stage_files(out: Path, lines: list[str], files: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.tsv").write_text("".join(line + "\n" for line in lines))
    (out / "run.json").write_text(json.dumps({"dry_run": False, "budgets": {"env": 15, "study": 255}}))
    for name, data in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_finalize_reports_timeouts_skips_failures_and_what_did_not_run(tmp_path):
    out = tmp_path / "out"
    correctness = [
        {"test": "tests/gpu/test_cuda.py::test_masks_match_cpu", "outcome": "passed", "duration_s": 3.0},
        {"test": "tests/gpu/test_cuda.py::test_accelerate", "outcome": "failed", "duration_s": 1.0, "message": "boom"},
    ]
    _stage_files(
        out,
        ["env\t0\t2.5\t15", "correctness\t1\t40.0\t75", "train_cost\t124\t130.2\t130", "accelerate\tskip\t0\t45"],
        {
            "env.json": {"torch": "2.11.0", "gpus": [{"name": "NVIDIA H100", "capability": "9.0", "memory_gib": 79}]},
            "correctness.jsonl": "\n".join(json.dumps(t) for t in correctness) + "\n",
            "train_cost.json": {"models": {"resnet50": {"rows": {}, "skipped": {}, "errors": {}}}},
            "accelerate.json": {"status": "skipped", "reason": "no CUDA"},
        },
    )
    assert gpu_check.main(["finalize", str(out), "--final"]) == 4
    summary = (out / "summary.md").read_text()
    assert "NVIDIA H100 (compute 9.0, 79 GiB)" in summary and "| 0. Environment | passed | 0 | 2.5 | 15 |" in summary
    assert "| 1. Correctness on CUDA | failed: 1 test(s) | 1 |" in summary
    assert "| 2. Training cost | timeout after 130 s | 124 |" in summary
    assert "| 3. 2:4 acceleration | skipped: no CUDA | skip |" in summary
    assert "| 4. Accuracy study | not run |" in summary
    assert "| test_accelerate | failed | 1.0 | boom |" in summary
    stage = json.loads((out / "train_cost.json").read_text())["stage"]
    assert stage == {"exit_code": 124, "wall_s": 130.2, "budget_s": 130.0, "status": "timeout after 130 s"}
    assert json.loads((out / "correctness.json").read_text())["counts"] == {"passed": 1, "failed": 1}


def test_finalize_mid_run_marks_pending_and_a_partial_study(tmp_path):
    out = tmp_path / "out"
    record = {"id": "main_maxq_1-16_s0", "method": "maxq", "n": 1, "m": 16, "seed": 0, "variant": "main"}
    record.update(epochs=6, top1_last=90.1, val_top1_last=90.3, nm_ok=True, train_time_s=80.0)
    record["curve"] = [{"epoch": e, "time_s": 12.0 + e} for e in (1, 2, 3)]
    status = {"planned": ["main_srste_1-16_s0", "main_maxq_1-16_s0"], "not_started": ["main_srste_1-16_s0"]}
    _stage_files(
        out,
        ["env\t0\t2.5\t15", "study\t1\t250.0\t255"],
        {"results/gpu/status.json": status, "results/gpu/main_maxq_1-16_s0.json": record},
    )
    assert gpu_check.main(["finalize", str(out)]) == 0  # partial is not a failure; pending stages are still to come
    summary = (out / "summary.md").read_text()
    assert "| 1. Correctness on CUDA | pending |" in summary and "(still running)" in summary
    assert "| 4. Accuracy study | partial: 1 of 2 runs | 1 |" in summary
    assert "| main_maxq_1-16_s0 | maxq | 1:16 | 0 | 6 | 90.10 | 90.30 | True | 80 | 14.0 |" in summary
    assert "not started: main_srste_1-16_s0" in summary


def test_require_marks_a_stage_skipped_when_a_module_is_missing(tmp_path):
    assert gpu_check.main(["require", str(tmp_path), "study", "json", "no_such_module_xyz"]) == 3
    assert json.loads((tmp_path / "study.json").read_text()) == {
        "status": "skipped",
        "reason": "no no_such_module_xyz",
    }
    assert gpu_check.main(["require", str(tmp_path), "env", "json"]) == 0


def test_builtin_runner_runs_checks_without_pytest(tmp_path):
    """The path taken where pytest is not installed: one check, on the CPU, in a fresh interpreter."""
    results = tmp_path / "checks.jsonl"
    env = {**os.environ, "MAXQ_TEST_DEVICE": "cpu", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "checks", str(results), "--only", "accelerate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (entry,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert entry["test"].endswith("check_accelerate") and entry["outcome"] == "passed"
    assert entry["properties"]["cpu"].startswith("refused")


# -- the GPU run's commands, rehearsed with a stand-in python (the dry run takes the other branch of each stage) --

STUB = """#!/usr/bin/env bash
# Stands in for the GPU machine's python: records every stage command, runs the bookkeeping for real.
if [ "${1:-}" = "-c" ]; then exec "$REAL_PY" "$@"; fi
if [ "${1:-}" = "scripts/gpu_check.py" ]; then
    case "${2:-}" in
        require) exit 0 ;;  # "CUDA and every package are there"
        env | finalize) exec "$REAL_PY" "$@" ;;
    esac
fi
"$REAL_PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >>"$CALLS"
"""


def _load(name: str):
    # Under a name of its own: benchmarks/accelerate.py as sys.modules["accelerate"] hid Hugging Face's accelerate
    # from every later test in the process.
    module_name = f"maxq_benchmark_{name}"
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_run_commands_are_accepted_by_the_scripts_they_call(tmp_path):
    stub, calls, data, out = tmp_path / "python", tmp_path / "calls.jsonl", tmp_path / "fm", tmp_path / "out"
    stub.write_text(STUB)
    stub.chmod(0o755)
    data.mkdir()
    for name in gpu_check.FMNIST_FILES:
        (data / name).touch()
    env = {**os.environ, "PY": str(stub), "REAL_PY": sys.executable, "CALLS": str(calls)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "## Stages" in proc.stdout, proc.stdout + proc.stderr
    budgets = json.loads((out / "run.json").read_text())["budgets"]
    assert sum(budgets.values()) <= 520 and set(budgets) == set(gpu_check.STAGES)  # 9 minutes, bookkeeping included
    commands = {}
    for line in calls.read_text().splitlines():
        argv = json.loads(line)
        key = "pytest" if argv[:2] == ["-m", "pytest"] else Path(argv[0]).stem
        commands[key] = argv[2:] if key == "pytest" else argv[1:]
    assert set(commands) == {"pytest", "train_cost", "accelerate", "study", "gpu_fsdp_check", "memory"}, commands

    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", *commands["pytest"]],  # the command's -q: node ids
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout[-3000:]
    for name in CHECK_NAMES:
        assert f"tests/gpu/test_cuda.py::test_{name}" in collected.stdout

    cost = _load("train_cost").parser().parse_args(commands["train_cost"])
    assert cost.device == "cuda" and [m.name for m in cost.models] == ["resnet50", "resnet18_cifar"]
    assert [(m.image, m.batch) for m in cost.models] == [(224, 128), (32, 256)]
    assert cost.compile_variants == ["dense", "maxq"] and cost.budget_s < budgets["train_cost"]
    accel = _load("accelerate").parser().parse_args(commands["accelerate"])
    assert not accel.dry_run and accel.models == ["vit_b_16", "resnet50"]
    study_args = commands["study"]
    assert study_args[study_args.index("--device") + 1] == "cuda" and "--quick" not in study_args
    assert study_args[study_args.index("--docs") + 1] == study_args[study_args.index("--results") + 1]
    assert float(study_args[study_args.index("--deadline") + 1]) < budgets["study"]
    study = _load("study")
    assert study.main([*study_args, "--list"]) == 0  # the flags parse and the GPU grid plans
    fsdp_spec = importlib.util.spec_from_file_location("gpu_fsdp_check", ROOT / "scripts" / "gpu_fsdp_check.py")
    fsdp = importlib.util.module_from_spec(fsdp_spec)
    fsdp_spec.loader.exec_module(fsdp)
    fsdp_args = fsdp.parser().parse_args(commands["gpu_fsdp_check"])
    assert fsdp_args.device == "cuda" and not fsdp_args.dry_run and fsdp_args.parts == ["lightning", "hf"]
    assert fsdp_args.out == out / "fsdp.json"
    memory = _load("memory").parser().parse_args(commands["memory"])
    assert memory.device == "cuda" and memory.in_process and not memory.tiny
    assert memory.models == ["linear8", "resnet50", "gpt2"] and memory.dtypes == ["fp32", "bf16"]
    assert memory.methods == ["dense", "oneshot", "srste", "maxq"] and memory.out == out / "memory.json"
