"""The study runner's plan and statistics (the runs themselves are in docs/RESULTS.md)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from maxq.train.recipe import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
spec_ = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec_)
sys.modules["study"] = study  # dataclasses look their module up
spec_.loader.exec_module(study)
SPEC = yaml.safe_load((ROOT / "configs" / "study.yaml").read_text())


def test_full_plan_is_the_grid_plus_ablations():
    runs = study.plan(SPEC, quick=False)
    main = [r for r in runs if r.record["variant"] == "main"]
    extra = SPEC["grid"]["extra_seeds"]
    # dense x seeds + (oneshot, srste, maxq) x patterns x seeds, + the extra seeds of the MaxQ vs SR-STE contrast
    assert len(main) == 3 + 3 * 4 * 3 + len(extra["methods"]) * 4 * len(extra["seeds"])
    assert len({r.id for r in runs}) == len(runs)
    ids = [r.id for r in runs]
    for r in runs:
        assert all(ids.index(dep) < ids.index(r.id) for dep in r.after)  # dependencies first
        options = {k: v for k, v in r.options.items() if k != "init"}
        cfg = TrainConfig.from_dict(options)  # every run is a valid `maxq train` configuration
        if r.record["method"] == "oneshot":
            assert cfg.epochs + SPEC["oneshot"]["dense_epochs"] == SPEC["base"]["epochs"]  # same total budget
    assert {r.record["variant"] for r in runs} - {"main"} >= {"no_queries", "no_incremental", "tau_0.1"}


def test_quick_plan_is_small():
    runs = study.plan(SPEC, quick=True)
    assert not any(r.id.endswith(("_s3", "_s4")) for r in runs)  # no extra seeds in a smoke test
    assert len(runs) <= 10 and all(r.record["variant"] != "main" or r.options["subset"] <= 5000 for r in runs)


def test_extra_seeds_reject_methods_that_need_pre_runs():
    spec = {**SPEC, "grid": {**SPEC["grid"], "extra_seeds": {"methods": ["oneshot"], "seeds": [7]}}}
    with pytest.raises(ValueError, match="extra_seeds"):
        study.plan(spec, quick=False)


@pytest.mark.parametrize(
    "t, df, p", [(0.0, 2, 1.0), (2.0, 2, 0.1835), (4.303, 2, 0.05), (2.228, 10, 0.05), (-3.0, 5, 0.0301)]
)
def test_t_test_p_values(t, df, p):
    assert study.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-3)


def _p_df2(t):
    """Two-sided p of Student's t with 2 degrees of freedom, closed form: 1 - |t| / sqrt(t^2 + 2)."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def _p_df4(t):
    """Two-sided p with 4 degrees of freedom: CDF 1/2 + 3/8 * s * (1 - t^2 / (12 (1 + t^2/4))), s = t/sqrt(1+t^2/4)."""
    u = 1 + t * t / 4
    return 2 * (0.5 - 3 / 8 * (abs(t) / math.sqrt(u)) * (1 - t * t / (12 * u)))


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 4.157609, 9.0])
def test_t_p_values_match_closed_forms(t):
    assert study.t_two_sided_p(t, 2) == pytest.approx(_p_df2(t), rel=1e-9, abs=1e-12)
    assert study.t_two_sided_p(-t, 2) == pytest.approx(_p_df2(t), rel=1e-9, abs=1e-12)
    assert study.t_two_sided_p(t, 4) == pytest.approx(_p_df4(t), rel=1e-9, abs=1e-12)


def test_paired_test_exact_values():
    a, b = [91.0, 90.5, 91.2], [90.0, 90.1, 90.4]
    result = study.paired_test(a, b)
    # By hand: differences 1.0, 0.4, 0.8; mean 0.7333; sample sd (n - 1) 0.30551; se = sd / sqrt(3) = 0.17638;
    # t = 4.1576 on 2 degrees of freedom; two-sided p = 1 - t / sqrt(t^2 + 2) = 0.05327. An unpaired test, a
    # one-sided p (0.0266) or the population sd (p 0.0365) all differ.
    assert result["pairs"] == 3
    assert result["gap"] == pytest.approx(0.7333333333333343, rel=1e-12)
    assert result["se"] == pytest.approx(0.17638342073763744, rel=1e-9)
    assert result["t"] == pytest.approx(4.157609203101551, rel=1e-9)
    assert result["p"] == pytest.approx(0.053270737593741346, rel=1e-7)
    # The same from the formula on data with 4 degrees of freedom; swapping a and b flips t and keeps p.
    a, b = [88.1, 87.4, 88.9, 87.7, 88.3], [87.6, 87.5, 88.0, 87.9, 87.7]
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 5
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4) / math.sqrt(5)
    result = study.paired_test(a, b)
    assert result["t"] == pytest.approx(mean / se, rel=1e-9)
    assert result["p"] == pytest.approx(_p_df4(mean / se), rel=1e-7)
    swapped = study.paired_test(b, a)
    assert swapped["t"] == pytest.approx(-result["t"]) and swapped["p"] == pytest.approx(result["p"])


def test_ablation_deltas_are_paired_by_seed():
    def rec(variant, nm, seed, top1, val):
        n, m = nm.split(":")
        return {
            "method": "maxq",
            "n": int(n),
            "m": int(m),
            "seed": seed,
            "variant": variant,
            "top1_last": top1,
            "top1_best": top1,
            "val_top1_last": val,
        }

    records = [rec("main", "1:16", s, 87.0 + s, 88.0 + s) for s in (0, 1, 2)]
    records += [rec("no_queries", "1:16", 1, 87.5, 88.5), rec("no_queries", "1:16", 0, 86.0, 88.25)]
    summary = study.summarize(records, SPEC)
    cell = summary["ablations"]["no_queries"]["1:16"]
    assert cell["seeds"] == [0, 1]  # sorted by seed, whatever the record order
    assert cell["delta_last"] == pytest.approx([-1.0, -0.5])  # against main seed 0 (87.0) and seed 1 (88.0)
    assert cell["delta_val"] == pytest.approx([0.25, -0.5])


def test_report_writes_tables_and_plot_and_keeps_the_prose(tmp_path):
    import json

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    (docs / "RESULTS.md").write_text(
        "# Results\n\nprose before\n<!-- study:begin -->\nold\n<!-- study:end -->\nafter\n"
    )
    for seed in (0, 1, 2):
        for method, base in (("dense", 91.0), ("oneshot", 89.0), ("srste", 89.5), ("maxq", 90.0)):
            for nm in ["-"] if method == "dense" else SPEC["grid"]["patterns"]:
                n, m = (None, None) if method == "dense" else map(int, nm.split(":"))
                top1 = base + 0.1 * seed
                record = {
                    "method": method,
                    "n": n,
                    "m": m,
                    "seed": seed,
                    "variant": "main",
                    "top1_last": top1,
                    "top1_best": top1,
                    "val_top1_last": top1,
                    "val_top1_best": top1,
                }
                (results / f"{method}_{nm.replace(':', '-')}_s{seed}.json").write_text(json.dumps(record))
    summary = study.report(SPEC, results, docs)
    assert summary["gaps"]["1:16"]["top1_last"]["gap"] == pytest.approx(0.5)
    text = (docs / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nprose before\n") and text.endswith("<!-- study:end -->\nafter\n")
    assert "old" not in text and "| maxq (3 seeds) | 90.10 ± 0.10 |" in text and "| 1:16 (3 seeds) |" in text
    assert (docs / "study_accuracy.png").stat().st_size > 10_000
    lines = study.closing_lines(summary)  # what the study prints last: the gaps, and where the files are
    assert any("MaxQ - SR-STE at 1:16: +0.50 top-1 points (last epoch, 3 seed pair(s)" in x for x in lines)
    assert f"tables: {docs / 'RESULTS.md'}" in lines and any(str(docs / "study_accuracy.png") in x for x in lines)


def test_json_written_by_the_study_has_no_nan(tmp_path):
    import json

    gap = study.paired_test([90.0], [89.5])  # one seed: no standard error, t or p
    study._write_json(tmp_path / "s.json", {"gaps": {"1:16": {"top1_last": gap}}})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and json.loads(text)["gaps"]["1:16"]["top1_last"]["p"] is None
    summary = {"gaps": {"1:16": {"top1_last": gap}}, "files": {"tables": "t.md", "plots": [], "summary": "s.json"}}
    assert "p n/a (one seed)" in study.closing_lines(summary)[0]


# -- the GPU study (configs/study_gpu.yaml, stage 4 of scripts/gpu_check.sh) ----------------------------------------

SPEC_GPU = yaml.safe_load((ROOT / "configs" / "study_gpu.yaml").read_text())


def test_gpu_plan_runs_both_seeds_of_1_16_first():
    runs = study.plan(SPEC_GPU, quick=False)
    assert [r.record["nm"] for r in runs] == ["1:16"] * 4 + ["2:4"] * 4  # grid.order: pattern
    assert {(r.record["method"], r.record["seed"]) for r in runs[:4]} == {
        (m, s) for m in ("srste", "maxq") for s in (0, 1)
    }
    for r in runs:
        cfg = TrainConfig.from_dict(r.options)
        assert (cfg.dataset, cfg.model) == ("fashion-mnist-32", "resnet18_cifar") and cfg.val_split > 0
        if cfg.method == "maxq":
            assert cfg.resolved_ramp[1] == 0.25 * cfg.epochs  # the paper's share of training
    (quick,) = study.plan(SPEC_GPU, quick=True)  # the dry run: one tiny training
    assert TrainConfig.from_dict(quick.options).subset <= 1000


def test_gpu_study_keeps_its_records_apart_from_the_cpu_study():
    assert SPEC_GPU["results"] == "results/gpu" and SPEC_GPU["docs_dir"] != "docs"
    assert "results" not in SPEC  # the CPU study stays in results/
    assert {r.record["variant"] for r in study.plan(SPEC_GPU, quick=False)} == {"gpu"}


def test_command_passes_device_data_and_run_folder(tmp_path):
    run = study.plan(SPEC_GPU, quick=False)[0]
    ex = study.Execution(jobs=4, threads=3, device="cuda", data_dir="data/fm", runs_dir=tmp_path / "runs")
    cmd, folder = study._command(run, tmp_path / "results", ex)
    assert folder == tmp_path / "runs" / run.id and (tmp_path / "runs" / f"{run.id}.yaml").exists()
    text = " ".join(cmd)
    assert "--device cuda" in text and "--data-dir data/fm" in text and "--threads 3" in text
    assert not (tmp_path / "results").exists()  # nothing but records and logs go there


def test_deadline_starts_no_run_that_cannot_finish(tmp_path):
    runs = study.plan(SPEC_GPU, quick=True)
    missing = study.execute(runs, tmp_path, study.Execution(jobs=1, deadline_s=0.0))
    assert missing == [runs[0].id]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["not_started"] == [runs[0].id] and status["finished"] == [] and status["planned"] == [runs[0].id]


# -- the long-schedule study (configs/study_long.yaml) -----------------------------------------------------------

SPEC_LONG = yaml.safe_load((ROOT / "configs" / "study_long.yaml").read_text())


def test_long_plan_matches_the_issue():
    runs = study.plan(SPEC_LONG, quick=False)
    cells = sorted((r.record["method"], r.record["nm"], r.record["variant"], r.record["seed"]) for r in runs)
    count = {}
    for method, nm, variant, _ in cells:
        count[(method, nm, variant)] = count.get((method, nm, variant), 0) + 1
    assert count == {
        ("dense", None, "long"): 1,
        ("srste", "1:16", "long"): 3,
        ("maxq", "1:16", "long"): 3,
        ("srste", "2:4", "long"): 2,
        ("maxq", "2:4", "long"): 2,
        ("maxq", "1:16", "long_order_random"): 3,
        ("maxq", "1:16", "long_ramp_75"): 3,
    }
    for r in runs:
        cfg = TrainConfig.from_dict(r.options)
        assert cfg.epochs == 20 and cfg.val_split == 0.1 and not cfg.per_step
        if r.record["method"] == "maxq":
            assert cfg.resolved_ramp == ((0.0, 15.0) if r.record["variant"] == "long_ramp_75" else (0.0, 5.0))


def _curve_record(method, seed, tops, vals):
    return {
        "method": method,
        "n": 1,
        "m": 16,
        "seed": seed,
        "variant": "long",
        "top1_last": tops[-1],
        "top1_best": max(tops),
        "val_top1_last": vals[-1],
        "val_top1_best": max(vals),
        "curve": [{"epoch": e + 1, "test_top1": t, "val_top1": v} for e, (t, v) in enumerate(zip(tops, vals))],
    }


def test_epoch_gaps_are_paired_per_epoch_and_reported(tmp_path):
    records = [
        _curve_record("srste", 0, [80.0, 85.0], [81.0, 86.0]),
        _curve_record("srste", 1, [81.0, 85.5], [82.0, 86.0]),
        _curve_record("maxq", 0, [79.0, 86.0], [80.0, 87.0]),
        _curve_record("maxq", 1, [81.5, 86.5], [82.0, 86.5]),
        _curve_record("maxq", 2, [90.0, 90.0], [90.0, 90.0]),  # no SR-STE partner: left out of the pairs
    ]
    spec = {**SPEC_LONG, "grid": {**SPEC_LONG["grid"], "patterns": ["1:16"]}, "report": {"curves": ["1:16"]}}
    rows = study.epoch_gaps(records, spec)["1:16"]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["seeds"] == 2
    assert rows[0]["gap_test"]["gap"] == pytest.approx(((79 - 80) + (81.5 - 81)) / 2)
    assert rows[1]["maxq_val"] == pytest.approx((87.0 + 86.5) / 2)
    assert rows[1]["gap_test"]["t"] == pytest.approx(study.paired_test([86.0, 86.5], [85.0, 85.5])["t"])

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# R\n<!-- study:begin -->\nkeep\n<!-- study:end -->\n")
    for i, r in enumerate(records):
        (results / f"r{i}.json").write_text(json.dumps(r))
    other = tmp_path / "summary.json"
    other.write_text(json.dumps({"gaps": {"1:16": {"top1_last": study.paired_test([87.0, 88.0], [86.5, 87.7])}}}))
    spec["report"] = {"curves": ["1:16"], "compare_with": str(other), "compare_label": "4 epochs", "label": "long"}
    study.report(spec, results, docs)
    text = (docs / "RESULTS.md").read_text()
    assert "<!-- study:begin -->\nkeep\n<!-- study:end -->" in text  # the 4-epoch block is left alone
    assert "<!-- study_long:begin -->" in text and "**Gap per epoch at 1:16**" in text
    assert "| 2 | 85.25 | 86.25 | +1.00 ± 0.00 |" in text
    assert "**MaxQ − SR-STE, 4 epochs vs long**" in text and "+0.40 ± 0.10" in text
    assert (docs / "study_long_curves.png").stat().st_size > 10_000


# -- the fine-tuning study (configs/study_finetune.yaml) ------------------------------------------------------------

SPEC_FT = yaml.safe_load((ROOT / "configs" / "study_finetune.yaml").read_text())


def test_finetune_plan_matches_the_issue():
    runs = study.plan(SPEC_FT, quick=False)
    parent, children = runs[0], runs[1:]
    assert parent.id == "parent" and parent.options["method"] == "dense" and parent.options["epochs"] == 20
    long_base = SPEC_LONG["base"]
    assert {k: parent.options[k] for k in long_base} == long_base  # the long study's recipe
    cells = {(r.record["arm"], r.record["nm"], r.record["budget"], r.record["seed"]) for r in children}
    assert len(cells) == len(children) == 5 * 2 * 2 * 3
    for r in children:
        assert r.after == ["parent"] and r.options["init"] == "@parent"
        cfg = TrainConfig.from_dict({**r.options, "init": "parent/checkpoint.pt"})  # "@parent": its checkpoint
        assert cfg.epochs == r.record["budget"] and cfg.lr < parent.options["lr"]
        assert (cfg.dataset, cfg.model, cfg.val_split, cfg.subset) == ("fashion-mnist", "cnn_small", 0.1, 48000)
        sparse = cfg.sparsity_config()
        if cfg.method == "maxq":
            assert cfg.per_step and cfg.resolved_ramp == (0.0, cfg.epochs / 2)
            assert sparse.soft_warmup == ("ramp" if r.record["arm"] == "maxq_ramp" else "none")
            assert sparse.queries == (r.record["arm"] != "maxq_noq")
        else:
            assert "ramp" not in r.options and "soft_warmup" not in r.options
    assert len(study.plan(SPEC_FT, quick=True)) == 1 + 5


@pytest.mark.slow
def test_finetune_quick_rehearsal_records_parent_before_and_curves(tmp_path):
    """The --quick rehearsal end to end on the synthetic set (a few seconds): parent, then every arm from its
    checkpoint; records, resumability and the report."""
    quick = {
        "parent": {"dataset": "synthetic", "epochs": 1, "subset": 256, "batch_size": 32},
        "base": {"dataset": "synthetic", "subset": 256},
        "finetune": {"budgets": [1], "patterns": ["1:16"], "seeds": [0]},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC_FT, "quick": quick}))
    results, docs = tmp_path / "results", tmp_path / "results"
    argv = ["--config", str(spec_path), "--quick", "--results", str(results), "--jobs", "2", "--threads", "1"]
    assert study.main(argv) == 0
    parent = json.loads((results / "parent.json").read_text())
    checkpoint = results / "runs" / "parent" / "checkpoint.pt"
    assert parent["checkpoint_sha256"] == study.sha256_file(checkpoint) and parent["role"] == "parent"
    records = {p.stem: json.loads(p.read_text()) for p in results.glob("ft_*.json")}
    assert len(records) == 5
    for r in records.values():
        assert r["parent"]["checkpoint_sha256_now"] == parent["checkpoint_sha256"] == r["parent"]["checkpoint_sha256"]
        assert len(r["curve"]) == 1 and r["before_finetune"]["val_top1"] is not None and r["nm_ok"]
    # Every block dense and no soft factor yet: the first forward is the parent itself.
    for arm in ("maxq_ramp", "maxq_noq"):
        assert records[f"ft_{arm}_1-16_e1_s0"]["before_finetune"]["test_top1"] == parent["top1_last"]
    # Resumable: nothing runs again; a record lost after its run finished is rebuilt from the folder.
    os_record = results / "ft_srste_1-16_e1_s0.json"
    os_record.unlink()
    mtime = (results / "runs" / "ft_srste_1-16_e1_s0" / "report.json").stat().st_mtime
    assert study.main(argv) == 0 and os_record.exists()
    assert (results / "runs" / "ft_srste_1-16_e1_s0" / "report.json").stat().st_mtime == mtime
    summary = json.loads((results / "summary.json").read_text())
    assert summary["parent"]["checkpoint_sha256"] == parent["checkpoint_sha256"] and not summary["parent_mismatch"]
    cell = summary["cells"]["maxq_ramp"]["1:16"]["1"]
    assert len(cell["curve_test_top1"]) == 2 and cell["curve_test_top1"][0] == parent["top1_last"]
    # Before any step it is the parent (every block dense), but that is not its N:M model: only epochs from the
    # end of the ramp (0.5 of 1 epoch -> epoch 1) count.
    assert cell["final_pattern_epoch"] == 1 and cell["epochs_within_test_top1"] != 0
    assert records["ft_maxq_ramp_1-16_e1_s0"]["ramp"] == [0.0, 0.5]
    assert summary["cells"]["oneshot"]["1:16"]["1"]["final_pattern_epoch"] == 0
    text = (docs / "RESULTS.md").read_text()
    assert "<!-- study_finetune:begin -->" in text and "**Before fine-tuning**" in text and "maxq_ramp" in text
    assert (docs / "study_finetune_curves.png").stat().st_size > 10_000


def test_finetune_gaps_and_epochs_within_from_records():
    def rec(arm, seed, curve, before=80.0, method="srste", options=None):
        return {
            "id": f"ft_{arm}_{seed}", "arm": arm, "method": method, "n": 2, "m": 4, "seed": seed, "budget": 2,
            "options": options or {},
            "variant": "finetune", "top1_last": curve[-1], "val_top1_last": curve[-1] + 1,
            "before_finetune": {"test_top1": before, "val_top1": before + 1},
            "curve": [{"epoch": e + 1, "test_top1": v, "val_top1": v + 1} for e, v in enumerate(curve)],
        }  # fmt: skip

    parent = {"id": "parent", "role": "parent", "variant": "parent", "top1_last": 92.0, "val_top1_last": 93.0}
    records = [parent, rec("srste", 0, [90.0, 91.6]), rec("srste", 1, [90.0, 91.0])]
    records += [rec("oneshot", 0, [89.0, 91.0]), rec("oneshot", 1, [89.0, 90.6])]
    spec = {**SPEC_FT, "finetune": {**SPEC_FT["finetune"], "patterns": ["2:4"], "budgets": [2]}}
    spec["report"] = {"within": 0.5, "pairs": [["srste", "oneshot"]]}
    summary = study.summarize_finetune(records, spec)
    gap = summary["gaps"]["srste - oneshot"]["2:4"]["2"]["top1_last"]
    assert gap["gap"] == pytest.approx(0.5) and gap["pairs"] == 2
    cell = summary["cells"]["srste"]["2:4"]["2"]
    assert cell["curve_test_top1"] == pytest.approx([80.0, 90.0, 91.3])
    assert cell["epochs_within_test_top1"] is None  # 91.3 < 92 - 0.5
    assert summary["cells"]["srste"]["2:4"]["2"]["epochs_within_val_top1"] is None
    summary = study.summarize_finetune(records, {**spec, "report": {**spec["report"], "within": 1.0}})
    assert summary["cells"]["srste"]["2:4"]["2"]["epochs_within_test_top1"] == 2
    assert summary["verdict"]["2:4"]["2"]["arm"] == "srste"


def test_finetune_epochs_within_count_only_from_the_end_of_the_ramp():
    """A MaxQ run starts at the parent (every block dense): it is within reach of the parent at epoch 0 and
    during its ramp, but only epochs at the final N:M pattern count."""

    def rec(arm, seed, curve, **extra):
        return {
            "id": f"ft_{arm}_{seed}", "arm": arm, "n": 2, "m": 4, "seed": seed, "budget": 4, "variant": "finetune",
            "top1_last": curve[-1], "val_top1_last": curve[-1],
            "before_finetune": {"test_top1": 92.0, "val_top1": 92.0},
            "curve": [{"epoch": e + 1, "test_top1": v, "val_top1": v} for e, v in enumerate(curve)], **extra,
        }  # fmt: skip

    parent = {"id": "parent", "role": "parent", "variant": "parent", "top1_last": 92.0, "val_top1_last": 92.0}
    records = [
        parent,
        rec("maxq", 0, [91.9, 80.0, 91.0, 91.8], method="maxq", options={"ramp": [0.0, 2.0]}),
        rec("maxq_noq", 0, [91.9, 91.9, 91.9, 91.9], method="maxq", ramp=[0.0, 1.5]),  # from report.json: wins
        rec("srste", 0, [91.9, 91.9, 91.9, 91.9], method="srste"),
        rec("maxq_ramp", 0, [91.9, 91.9, 91.9, 91.9], method="maxq"),  # no ramp recorded: cannot tell
    ]
    spec = {**SPEC_FT, "finetune": {**SPEC_FT["finetune"], "patterns": ["2:4"], "budgets": [4]}}
    spec["report"] = {"within": 0.5, "pairs": []}
    cells = study.summarize_finetune(records, spec)["cells"]
    got = {arm: (c["2:4"]["4"]["final_pattern_epoch"], c["2:4"]["4"].get("epochs_within_test_top1"))
           for arm, c in cells.items()}  # fmt: skip
    assert got == {"maxq": (2, 4), "maxq_noq": (2, 2), "srste": (0, 0), "maxq_ramp": (None, None)}
