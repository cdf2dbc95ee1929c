"""The study runner's plan and statistics (the runs themselves are in docs/RESULTS.md)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from maxq.recipe import TrainConfig

ROOT = Path(__file__).parent.parent
spec_ = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec_)
sys.modules["study"] = study  # dataclasses look their module up
spec_.loader.exec_module(study)
SPEC = yaml.safe_load((ROOT / "configs" / "study.yaml").read_text())


def test_full_plan_is_the_grid_plus_ablations():
    runs = study.plan(SPEC, quick=False)
    main = [r for r in runs if r.record["variant"] == "main"]
    assert len(main) == 3 + 3 * 4 * 3  # dense x seeds + (oneshot, srste, maxq) x patterns x seeds
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
    assert len(runs) <= 10 and all(r.record["variant"] != "main" or r.options["subset"] <= 5000 for r in runs)


@pytest.mark.parametrize(
    "t, df, p", [(0.0, 2, 1.0), (2.0, 2, 0.1835), (4.303, 2, 0.05), (2.228, 10, 0.05), (-3.0, 5, 0.0301)]
)
def test_t_test_p_values(t, df, p):
    assert study.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-3)


def test_paired_test():
    result = study.paired_test([91.0, 90.5, 91.2], [90.0, 90.1, 90.4])
    assert result["gap"] == pytest.approx(0.7333, abs=1e-3) and result["pairs"] == 3
    assert 0 < result["p"] < 0.2
