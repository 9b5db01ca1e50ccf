"""Weight masks and reconstructions of unstructured pruning: pure functions over one weight matrix.

- `magnitude_mask`: the smallest |W| of the whole layer (the baseline of both papers).
- `wanda_mask`: the smallest |W_ij| * ||X_j||_2 within each output row (Sun et al. 2023,
  "A Simple and Effective Pruning Approach for Large Language Models").
- `sparsegpt_prune`: OBS-style row-wise reconstruction with the inverse Hessian of the layer's
  inputs, column block by column block, the mask chosen adaptively per block (Frantar &
  Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot");
  follows the reference implementation (github.com/IST-DASLab/sparsegpt).

`n_m = (n, m)` means semi-structured N:M: in every group of m consecutive input weights of a
row, n are kept (2:4 keeps 2 of 4). A mask is True where the weight is pruned.
"""

from __future__ import annotations

import torch


def _check_n_m(n_m: tuple[int, int], cols: int) -> tuple[int, int]:
    n, m = n_m
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input width ({cols}) divisible by m={m}")
    return n, m


def _lowest(score: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Boolean mask of the k lowest scores (over all of `score` when dim is None, else along dim)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        return mask.view(-1).index_fill_(0, idx, True).view_as(score)
    return mask.scatter_(dim, torch.topk(score, k, dim=dim, largest=False).indices, True)


def n_m_mask(score: torch.Tensor, n_m: tuple[int, int]) -> torch.Tensor:
    """Prune the m-n lowest scores in every group of m consecutive columns: (rows, cols) bool."""
    n, m = _check_n_m(n_m, score.shape[1])
    groups = score.reshape(score.shape[0], -1, m)  # (rows, cols/m, m)
    return _lowest(groups, m - n, dim=-1).reshape(score.shape)


def magnitude_mask(w: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Prune the round(sparsity * numel) smallest |w| of the layer (or N:M groups): (rows, cols) bool."""
    score = w.abs().float()
    if n_m is not None:
        return n_m_mask(score, n_m)
    return _lowest(score, round(sparsity * w.numel()))


def wanda_mask(w: torch.Tensor, x_norm: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda: score |W_ij| * ||X_j||_2; prune round(sparsity * cols) lowest per output row (or N:M).

    w (rows, cols); x_norm (cols,) the L2 norm of each input feature over all calibration tokens.
    """
    score = w.abs().float() * x_norm.float()[None, :]  # (rows, cols)
    if n_m is not None:
        return n_m_mask(score, n_m)
    return _lowest(score, round(sparsity * w.shape[1]), dim=1)


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    n_m: tuple[int, int] | None = None, blocksize: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """SparseGPT: the pruned and reconstructed weight (rows, cols), same dtype as w.

    hessian (cols, cols) = X^T X / n of the layer's inputs (any positive scale). Columns are
    visited left to right; pruning column i moves its error onto the not-yet-visited columns
    through the upper Cholesky factor of H^-1 (the OBS update, shared by all rows). Within
    each block of `blocksize` columns the mask takes the round(sparsity * rows * block) lowest
    w^2 / [H^-1]_ii^2 (adaptive mask selection); with N:M it chooses per group of m columns.
    `damp` adds damp * mean(diag H) to the diagonal so the inverse exists.
    """
    rows, cols = w.shape
    if n_m is not None:
        n, m = _check_n_m(n_m, cols)
        if blocksize % m:
            raise ValueError(f"blocksize ({blocksize}) must be a multiple of m={m}")
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights are free to drop
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(cols, dtype=H.dtype) * (damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # (cols, cols) upper

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (rows, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (count,)
        if n_m is None:
            mask1 = _lowest(W1 ** 2 / d[None, :] ** 2, round(sparsity * rows * count))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            if n_m is not None and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2  # (rows, m) of the updated weights
                mask1[:, i:i + m] = _lowest(tmp, m - n, dim=1)
            w_col = W1[:, i]
            q = w_col.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w_col - q) / d[i]  # (rows,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)
