"""SparseGPT (Frantar & Alistarh, *SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot*, 2023):
N:M pruning with weight reconstruction, from the Hessian of the layer's squared error ``H = 2 X^T X / T``.

The weight is pruned one column (input) at a time, left to right. Pruning column ``j`` of a row is an Optimal
Brain Surgeon step restricted to the columns not yet processed, ``F = {j, ..., D-1}``: set the pruned weights to 0
and move the error into the remaining columns of the same row,

    delta W[:, F] = -((w_j - q_j) / [H_F^-1]_jj) * [H_F^-1]_{j, F},

which minimises the increase of ``||(W - W') X^T||^2`` given the pruned value. The rows ``[H_F^-1]_{j, F} /
sqrt([H_F^-1]_jj)`` of every shrinking ``F`` are the rows of the upper Cholesky factor ``U`` of ``H^-1``, so one
factorisation serves all columns. At the first column of every N:M block, the ``n`` weights of each row's block
with the largest OBS saliency ``w^2 / [H_F^-1]_jj = w^2 / U_jj^2`` (the weights as updated so far) are kept, the
others pruned.

Columns are processed in blocks of ``blocksize``: inside a block the updates are applied column by column; the
columns after the block receive the block's accumulated updates at once (the paper's lazy batch update: same
result, far fewer memory passes). The diagonal is dampened by ``damp`` times its mean, and inputs that were always
0 (``H_jj = 0``) get a unit diagonal and their weights set to 0, as in the authors' code.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..core.nm import nm_keep, validate_nm
from .columns import compute_dtype

__all__ = ["inverse_hessian_factor", "sparsegpt_prune"]

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """The upper Cholesky factor ``U`` of the dampened ``H^-1`` (``H^-1 = U^T U``), and the mask of dead inputs.

    Args:
        hessian: ``[D, D]``, symmetric positive semi-definite (``2 X^T X / T``).
        damp: added to the diagonal, times the mean diagonal.

    Returns:
        ``(U, dead)``: ``U`` ``[D, D]`` upper triangular (float32, float64 for a float64 ``hessian``); ``dead``
        ``[D]`` bool, the inputs with ``H_jj = 0``.
        Should the dampened Hessian still not be positive definite (rounding), the damping is raised tenfold until
        it is (logged).
    """
    h = hessian.detach().to(compute_dtype(hessian.dtype), copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    base = h.diagonal().mean()
    for attempt in range(6):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * base)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:  # one host sync per layer: calibration is not a training step
            break
        log.warning("maxq: Hessian not positive definite with damp=%g; retrying with %g", damp * 10**attempt,
                    damp * 10 ** (attempt + 1))  # fmt: skip
    else:
        raise RuntimeError("the calibration Hessian is not positive definite even with 10^5 x the damping")
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True), dead


def sparsegpt_prune(
    weight: Tensor, hessian: Tensor, n: int, m: int, *, blocksize: int = 128, damp: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """N:M-prune ``weight`` and reconstruct its kept weights from ``hessian`` (see the module doc).

    Args:
        weight: ``[O, D]``, ``D % m == 0``.
        hessian: ``[D, D]``, ``2 X^T X / T`` of the layer's input columns.
        blocksize: columns per lazy-update block (a multiple of ``m``).
        damp: dampening, a share of the mean diagonal of ``hessian``.

    Returns:
        ``(pruned weight, keep, loss)``: a new ``[O, D]`` tensor (float32; float64 for a float64 weight) with
        the pruned weights exactly 0 and the kept ones updated; the bool mask; the summed OBS loss estimate
        ``sum (w - q)^2 / (2 [H_F^-1]_jj)`` (a 0-d tensor): the predicted ``||(W - W') X^T||_F^2 / T`` for ``X``
        ``[T, D]``, the output error per calibration row.
    """
    validate_nm(n, m)
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by m={m}")
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight with {cols} input columns")
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m}")
    w = weight.detach().to(compute_dtype(weight.dtype), copy=True)
    u, dead = inverse_hessian_factor(hessian.to(w.dtype), damp)
    w[:, dead] = 0.0
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=w.dtype, device=w.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()  # the block's weights, updated column by column
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        diag = u_block.diagonal()
        for i in range(end - start):
            if i % m == 0:  # choose this N:M block's survivors from the weights as updated so far
                scores = block[:, i : i + m].square() / diag[i : i + m].square().unsqueeze(0)
                keep[:, start + i : start + i + m] = nm_keep(scores, n, m)
            col = block[:, i].clone()
            kept = keep[:, start + i]
            err = col.masked_fill(kept, 0.0) / diag[i]  # (w - q) / U_jj: q keeps the kept weights, 0 elsewhere
            block[:, i:].sub_(err.unsqueeze(1) * u_block[i, i:].unsqueeze(0))
            block[:, i] = col.masked_fill(~kept, 0.0)  # = q; exact zeros (the update leaves rounding residue)
            errors[:, i] = err
            loss += err.square().sum() / 2
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]  # the lazy update of every later column
    return w, keep, loss
