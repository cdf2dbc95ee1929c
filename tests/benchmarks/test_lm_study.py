"""The language-model study (benchmarks/lm_study.py): its corpus, its plan, and a --quick rehearsal of the whole
pipeline -- tokenizer, parent, every arm, report (the study itself runs in the background, docs/RESULTS.md §8)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lm_study = _load("lm_study")
lm_corpus = sys.modules["lm_corpus"]
SPEC = yaml.safe_load((ROOT / "configs" / "study_lm.yaml").read_text())


def test_corpus_is_the_stdlib_without_tests_split_by_file():
    corpus = lm_corpus.stdlib_corpus()
    assert "argparse.py" in corpus.files and "json/decoder.py" in corpus.files
    parts = {p for f in corpus.files for p in f.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert list(corpus.files) == sorted(corpus.files)
    splits = {name: set(corpus.split(name)) for name in lm_corpus.SPLITS}
    assert sum(map(len, splits.values())) == len(corpus.files) and not splits["train"] & splits["test"]
    assert 0.8 < len(splits["train"]) / len(corpus.files) < 0.97  # 90 / 5 / 5 by path hash
    assert lm_corpus.split_of("argparse.py") == lm_corpus.split_of("argparse.py")
    again = lm_corpus.stdlib_corpus()
    assert (again.files_sha256, again.content_sha256) == (corpus.files_sha256, corpus.content_sha256)


def test_plan_is_parent_then_every_arm_budget_and_seed():
    runs = lm_study.plan(SPEC)
    ft = SPEC["finetune"]
    assert runs[0].id == "parent" and len(runs) == 1 + len(ft["arms"]) * len(ft["budgets"]) * len(ft["seeds"])
    assert all(r.after == ["parent"] for r in runs[1:]) and len({r.id for r in runs}) == len(runs)
    assert [r.seed for r in runs[1:]] == sorted(r.seed for r in runs[1:])  # seed by seed
    for arm in ft["arms"].values():  # every arm is a valid maxq config (or dense)
        config = lm_study.sparsity_config(SPEC, arm)
        assert config is None or (config.n, config.m) == (2, 4)


def test_quick_rehearsal_writes_records_summary_and_report(tmp_path):
    results = tmp_path / "lm"
    assert lm_study.main(["--quick", "--inline", "--results", str(results)]) == 0
    quick = lm_study.effective(SPEC, quick=True)
    runs = lm_study.plan(quick)
    records = {r.id: json.loads((results / f"{r.id}.json").read_text()) for r in runs}
    parent = records.pop("parent")
    for record in records.values():
        assert record["corpus"]["files_sha256"] == parent["corpus"]["files_sha256"]
        assert record["parent"]["sha256"] == parent["parent_sha256"] and record["command"] and record["versions"]
        assert record["nm_ok"] is (None if record["arm"] == "dense" else True)
        assert record["test_ppl"] > 1 and record["wall_time_s"] > 0
    # the one-shot arms start pruned, the ramped arms start as the parent itself
    assert records["gradual_b4_s0"]["test_ppl_before"] == pytest.approx(parent["test_ppl"], rel=1e-6)
    assert records["sparsegpt_b4_s0"]["calibration"]["layers"] == 4 * quick["model"]["n_layer"]
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["cells"]) == set(quick["finetune"]["arms"]) and summary["records"] == len(runs)
    block = (results / "RESULTS.md").read_text()
    assert "<!-- study_lm:begin -->" in block and "Beside the anchor" in block and (results / "study_lm.png").exists()
    # resumable: a second call finds every record and runs nothing
    assert lm_study.main(["--quick", "--inline", "--results", str(results)]) == 0
