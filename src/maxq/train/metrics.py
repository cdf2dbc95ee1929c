"""Classification metrics, summed per batch so that batches, processes and files add up exactly."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["batch_counts", "from_counts"]


def batch_counts(logits: Tensor, y: Tensor) -> Tensor:
    """``[loss sum, top-1 hits, top-5 hits, samples]`` of one batch, float64 on ``logits``' device (no host sync).

    Args:
        logits: ``[B, C]`` scores (any float dtype; the loss is computed in float32).
        y: ``[B]`` class indices.
    """
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return torch.stack(
        [
            nn.functional.cross_entropy(logits, y, reduction="sum").double(),
            (top[:, 0] == y).sum().double(),
            (top == y[:, None]).any(dim=1).sum().double(),
            torch.full((), float(y.numel()), dtype=torch.float64, device=logits.device),  # a fill: no copy
        ]
    )


def from_counts(totals: Tensor) -> dict[str, float]:
    """Summed `batch_counts` -> ``loss`` (mean, nats), ``top1`` and ``top5`` (percent)."""
    loss, top1, top5, count = (float(v) for v in totals)
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}
