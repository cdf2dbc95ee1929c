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


def test_axes_count_epochs_alike_with_whole_ticks_and_mark_the_shipped_model():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maxq.train.plots import _figure

    one = [{**HISTORY[0], "epoch": 1, "dense_fraction": 1.0}]
    fig = _figure(one, CFG, folded_top1=22.5)  # a one-epoch run whose folded model differs from its epoch
    try:
        for ax in fig.axes:
            assert ax.get_xlim() == fig.axes[0].get_xlim() and ax.get_xlabel() == "epochs trained"
            assert ax.get_xlim()[0] < 0 and ax.get_xlim()[1] > 1
            ticks = [t for t in ax.get_xticks() if 0 <= t <= 1]
            assert ticks == [0.0, 1.0], ticks  # not 0.96 ... 1.04
        labels = fig.axes[1].get_legend_handles_labels()[1]
        assert "shipped (folded), test" in labels
    finally:
        plt.close(fig)
    fig = _figure(HISTORY, CFG, folded_top1=HISTORY[-1]["test_top1"])  # folding changed nothing: no marker
    try:
        assert "shipped (folded), test" not in fig.axes[1].get_legend_handles_labels()[1]
        assert len({ax.get_xlim() for ax in fig.axes}) == 1 and 3 < fig.axes[0].get_xlim()[1] < 3.2
    finally:
        plt.close(fig)


def test_a_dense_run_title_has_no_pattern():
    from maxq.train.plots import _figure

    fig = _figure(HISTORY, SimpleNamespace(**{**CFG.__dict__, "method": "dense"}))
    assert fig._suptitle.get_text().startswith("dense  cnn_small")
