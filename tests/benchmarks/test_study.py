"""The study runner's plan and statistics (the runs themselves are in docs/RESULTS.md)."""

import importlib.util
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
