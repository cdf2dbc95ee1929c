"""Run plots: written where matplotlib exists, skipped with a warning (never a failed run) where it does not."""

import logging
import sys
from types import SimpleNamespace

from maxq.train.plots import plot_run

HISTORY = [
    {"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.1 / e, "train_top1": 50 + e, "test_top1": 49 + e,
     "dense_fraction": max(0.0, 1 - e / 2)}
    for e in (1, 2, 3)
]  # fmt: skip
CFG = SimpleNamespace(method="maxq", nm="2:4", model="cnn_small", dataset="synthetic", seed=0)


def test_plot_is_written(tmp_path):
    assert plot_run(HISTORY, CFG, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_missing_matplotlib_skips_the_plot(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with caplog.at_level(logging.WARNING, logger="maxq.train.plots"):
        assert plot_run(HISTORY, CFG, tmp_path / "curves.png") is False
    assert not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in caplog.text
