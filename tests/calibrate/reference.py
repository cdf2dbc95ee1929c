"""Plain reference implementations of calibrated N:M pruning, written from the papers with loops and explicit
inverses: no Cholesky trick, no lazy batches, no shared helpers from maxq. Slow; small shapes only."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_top(scores: Tensor, n: int) -> Tensor:
    """Bool mask of the ``n`` largest scores of every row of ``scores`` ``[R, m]`` (one block per row); ties go to
    the lower index (a stable sort of the negated scores)."""
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :n]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def _prune_blocks(weight: Tensor, scores: Tensor, n: int, m: int) -> Tensor:
    """Zero, in every block of ``m`` consecutive columns of every row, all but the ``n`` best-scored weights."""
    out = weight.clone()
    for b in range(0, weight.shape[1], m):
        keep = keep_top(scores[:, b : b + m], n)
        out[:, b : b + m] = torch.where(keep, weight[:, b : b + m], torch.zeros_like(keep, dtype=weight.dtype))
    return out


def ref_magnitude(weight: Tensor, n: int, m: int) -> Tensor:
    return _prune_blocks(weight, weight.abs(), n, m)


def ref_wanda(weight: Tensor, inputs: Tensor, n: int, m: int) -> Tensor:
    """Wanda: score ``|W_oj| * ||X_j||_2`` over the calibration rows ``inputs`` ``[T, D]``; per output row and
    block of ``m`` inputs keep the ``n`` best; kept weights unchanged."""
    norms = torch.stack([torch.linalg.vector_norm(inputs[:, j].double()) for j in range(inputs.shape[1])])
    return _prune_blocks(weight, weight.abs().double() * norms.unsqueeze(0), n, m)


def ref_hessian(inputs: Tensor) -> Tensor:
    """``2 X^T X / T`` from all calibration rows at once."""
    x = inputs.double()
    return 2.0 * x.t() @ x / x.shape[0]


def ref_sparsegpt(weight: Tensor, hessian: Tensor, n: int, m: int, damp: float = 0.01) -> Tensor:
    """SparseGPT, column by column, with the inverse of the Hessian restricted to the remaining columns computed
    afresh at every step (float64):

    * dead inputs (``H_jj = 0``): unit diagonal, weights 0; then ``H += damp * mean(diag H) * I``;
    * at the first column ``k`` of every block: each column ``c`` of the block gets the saliency
      ``w_c^2 / [inv(H[c:, c:])]_00`` (the weights as updated so far); keep the ``n`` largest per row;
    * column ``k``: ``q`` = the kept weights, and the OBS update of the remaining columns
      ``W[:, k:] -= (w_k - q) / [Hinv]_00 * [Hinv]_0,:`` with ``Hinv = inv(H[k:, k:])``.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for k in range(cols):
        if k % m == 0:
            diag = torch.stack([torch.linalg.inv(h[c:, c:])[0, 0] for c in range(k, k + m)])
            keep[:, k : k + m] = keep_top(w[:, k : k + m] ** 2 / diag.unsqueeze(0), n)
        hinv = torch.linalg.inv(h[k:, k:])
        q = torch.where(keep[:, k], w[:, k], torch.zeros_like(w[:, k]))
        w[:, k:] -= ((w[:, k] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        w[:, k] = q
    return w
