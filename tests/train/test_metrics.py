import pytest
import torch
from torch import nn

from maxq.train.metrics import batch_counts, from_counts


@pytest.mark.parametrize("classes", [3, 10])  # fewer than 5 classes: top-5 is every class
def test_counts_add_up_over_batches_to_the_plain_metrics(classes):
    torch.manual_seed(0)
    logits, y = torch.randn(50, classes), torch.randint(0, classes, (50,))
    totals = batch_counts(logits[:17], y[:17]) + batch_counts(logits[17:], y[17:])
    got = from_counts(totals)
    rank = (logits > logits.gather(1, y[:, None])).sum(1)  # classes scoring above the true one (no ties here)
    assert totals.dtype == torch.float64 and float(totals[3]) == 50
    assert got["top1"] == pytest.approx(100 * float((rank == 0).float().mean()))
    assert got["top5"] == pytest.approx(100 * float((rank < 5).float().mean()))
    assert got["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)
