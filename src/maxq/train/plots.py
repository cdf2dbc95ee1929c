"""PNG plots of a run: loss, accuracy and the sparsity ramp against epochs.

Every panel has the same x axis, **epochs trained**: an epoch's metrics sit at its end (epoch 1 at x = 1), and the
ramp's dense fraction ``p``, set at an epoch's start, is drawn from its start to its end (epoch 1 spans 0-1). Ticks
are whole epochs. Where folding changed the accuracy (an unfinished ramp pruned at the end), the shipped model's
top-1 is marked at the run's end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["plot_run"]

log = logging.getLogger(__name__)


def plot_run(history: list[dict[str, Any]], cfg: Any, path: str | Path, folded_top1: float | None = None) -> bool:
    """Three panels: train/test loss, train/test (and validation) top-1, and the dense-block fraction ``p``.

    Args:
        folded_top1: the shipped (folded) model's test top-1; marked when it differs from the last epoch's.

    Returns ``False`` (and writes nothing) where matplotlib is not installed: a plot never fails a run.
    """
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plot written to %s", path)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _figure(history, cfg, folded_top1)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _figure(history: list[dict[str, Any]], cfg: Any, folded_top1: float | None = None) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    last = epochs[-1] if epochs else 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    axes[0].set(ylabel="loss", title="loss")
    axes[1].plot(epochs, [h["train_top1"] for h in history], "o-", label="train")
    axes[1].plot(epochs, [h["test_top1"] for h in history], "o-", label="test")
    if history and "val_top1" in history[0]:
        axes[1].plot(epochs, [h["val_top1"] for h in history], "o-", label="val")
    if folded_top1 is not None and history and abs(folded_top1 - history[-1]["test_top1"]) > 1e-9:
        axes[1].plot([last], [folded_top1], "*", markersize=13, color="crimson", label="shipped (folded), test")
    axes[1].set(ylabel="top-1 (%)", title="accuracy")
    _ramp_panel(axes[2], history, cfg, last)
    for ax in axes:
        ax.set(xlabel="epochs trained", xlim=(-0.04 * last, 1.04 * last))  # room for the markers at the ends
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(last, 10) + 1))
        ax.grid(alpha=0.3)
        ax.legend()
    dense = getattr(cfg, "method", "") == "dense"
    what = "dense" if dense else f"{cfg.method} {cfg.nm}"
    fig.suptitle(f"{what}  {cfg.model} on {cfg.dataset}  (seed {cfg.seed})")
    fig.tight_layout()
    return fig


def _ramp_panel(ax: Any, history: list[dict[str, Any]], cfg: Any, last: int) -> None:
    """``p`` as the run's schedule set it (per epoch: held from an epoch's start to its end; per step: smooth),
    and the dense blocks measured at each epoch's end."""
    epochs = [h["epoch"] for h in history]
    config = cfg.sparsity_config() if hasattr(cfg, "sparsity_config") else None
    if config is not None and getattr(cfg, "per_step", False):
        xs = [last * i / 200 for i in range(201)]
        ax.plot(xs, [config.dense_fraction(x) for x in xs], label="p (set, per step)")
    elif history:
        ramp_x = [e - 1 for e in epochs] + [epochs[-1]]
        ramp_y = [h["dense_fraction"] for h in history] + [history[-1]["dense_fraction"]]
        ax.step(ramp_x, ramp_y, where="post", label="p (set each epoch)")
    if history and "dense_block_fraction" in history[0]:
        ax.plot(epochs, [h["dense_block_fraction"] for h in history], "o", label="dense blocks (measured)")
    ax.set(ylabel="share of blocks kept dense", title="incremental sparsity ramp", ylim=(-0.05, 1.05))
