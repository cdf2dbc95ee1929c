"""Plain reference implementations of calibrated N:M pruning, written from the papers with loops and explicit
inverses: no Cholesky trick, no lazy batches, no shared helpers from maxq. Slow; small shapes only."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_top(scores: list[float], n: int) -> list[bool]:
    """The ``n`` largest of one block; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    chosen = set(order[:n])
    return [j in chosen for j in range(len(scores))]


def ref_magnitude(weight: Tensor, n: int, m: int) -> Tensor:
    out = weight.clone()
    rows, cols = weight.shape
    for o in range(rows):
        for b in range(0, cols, m):
            keep = keep_top([abs(float(weight[o, b + j])) for j in range(m)], n)
            for j in range(m):
                if not keep[j]:
                    out[o, b + j] = 0.0
    return out


def ref_wanda(weight: Tensor, inputs: Tensor, n: int, m: int) -> Tensor:
    """Wanda: score ``|W_oj| * ||X_j||_2`` over the calibration rows ``inputs`` ``[T, D]``; per output row and
    block of ``m`` inputs keep the ``n`` best; kept weights unchanged."""
    rows, cols = weight.shape
    norms = [float(torch.linalg.vector_norm(inputs[:, j].double())) for j in range(cols)]
    out = weight.clone()
    for o in range(rows):
        for b in range(0, cols, m):
            keep = keep_top([abs(float(weight[o, b + j])) * norms[b + j] for j in range(m)], n)
            for j in range(m):
                if not keep[j]:
                    out[o, b + j] = 0.0
    return out


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
            diag = [float(torch.linalg.inv(h[c:, c:])[0, 0]) for c in range(k, k + m)]
            for o in range(w.shape[0]):
                choice = keep_top([float(w[o, k + j]) ** 2 / diag[j] for j in range(m)], n)
                for j in range(m):
                    keep[o, k + j] = choice[j]
        hinv = torch.linalg.inv(h[k:, k:])
        q = torch.where(keep[:, k], w[:, k], torch.zeros_like(w[:, k]))
        w[:, k:] -= ((w[:, k] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        w[:, k] = q
    return w
