"""PNG plots of a run: loss, accuracy and the sparsity ramp against epochs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["plot_run"]

log = logging.getLogger(__name__)


def plot_run(history: list[dict[str, Any]], cfg: Any, path: str | Path) -> bool:
    """Three panels: train/test loss, test (and validation) top-1, and the dense-block fraction ``p``.

    Returns ``False`` (and writes nothing) where matplotlib is not installed: a plot never fails a run.
    """
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plot written to %s", path)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].plot(epochs, [h["train_top1"] for h in history], "o-", label="train")
    axes[1].plot(epochs, [h["test_top1"] for h in history], "o-", label="test")
    if history and "val_top1" in history[0]:
        axes[1].plot(epochs, [h["val_top1"] for h in history], "o-", label="val")
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    # p is set at the start of each epoch and held through it: a staircase ending at the last epoch's end.
    ramp_x = [e - 1 for e in epochs] + ([epochs[-1]] if epochs else [])
    ramp_y = [h["dense_fraction"] for h in history] + ([history[-1]["dense_fraction"]] if history else [])
    axes[2].step(ramp_x, ramp_y, where="post", label="p (set)")
    if history and "dense_block_fraction" in history[0]:
        axes[2].plot(
            [e - 1 for e in epochs], [h["dense_block_fraction"] for h in history], "o", label="dense blocks (measured)"
        )
    axes[2].set(
        xlabel="epoch", ylabel="share of blocks kept dense", title="incremental sparsity ramp", ylim=(-0.05, 1.05)
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{cfg.method} {cfg.nm}  {cfg.model} on {cfg.dataset}  (seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
