"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), following the reference implementation (IST-DASLab/gptq).

Per linear layer, from calibration inputs X: H = 2 X^T X / tokens; dead columns (H_ii = 0) are
zeroed; 1% of mean(diag H) is added to the diagonal; with act-order the columns are processed
in order of decreasing H_ii; the upper Cholesky factor of H^-1 drives the column-by-column
rounding, whose error is spread over the not yet quantized columns, lazily in blocks of 128.

Groups with act-order: *static groups* (the reference's `--static-groups`): every group's scale
and zero are fitted on the original weights of its contiguous columns before any update, so
the stored format is the plain one (no g_idx permutation table) and the kernels stay simple.

Layers go block by block: each block's Hessians come from the outputs of the already
quantized blocks before it (the calibration activations are fed forward through quantized
blocks), all linears of a block from one pass ("true sequential" is not done).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from lilliput.compress.grid import Grid, grid_for, layer_bits, target_linears
from lilliput.compress.qconfig import QUANTIZERS, GPTQConfig
from lilliput.core.layers import set_layer


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, grid: Grid, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """GPTQ-rounded w (N, K) on `grid` (fitted on w), given H (K, K): the dequantized result."""
    W = w.float().clone()
    H = H.float().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = grid.scale.repeat_interleave(grid.group, dim=1)  # (N, K) per column
    zero = grid.zero.repeat_interleave(grid.group, dim=1)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H, scale, zero = W[:, perm], H[perm][:, perm], scale[:, perm], zero[:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    lo, hi = (-127, 127) if grid.bits == 8 else (0, 15)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: OpenMP barriers cost 20x on a busy machine (measured)
    try:
        Q = _columns(W, Hinv, scale, zero, lo, hi, block_size)
    finally:
        torch.set_num_threads(threads)
    return Q[:, torch.argsort(perm)]


def _columns(W, Hinv, scale, zero, lo: int, hi: int, block_size: int) -> torch.Tensor:
    """The GPTQ column loop over permuted W (N, K) with the Cholesky factor Hinv; rounded W."""
    K = W.shape[1]
    Q = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = W1[:, i], Hinv1[i, i]
            s, z = scale[:, i1 + i], zero[:, i1 + i]
            q = ((col / s + z).round().clamp(lo, hi) - z) * s
            Q1[:, i] = q
            err = (col - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def run_block(block: nn.Module, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The block's outputs for x (n, T, C), a few sequences at a time (no state, causal)."""
    return torch.cat([block(x[i:i + batch]) for i in range(0, len(x), batch)])


def layerwise(model, ids: torch.Tensor, quantize_block: Callable[[int, nn.Module, torch.Tensor], None],
              batch: int = 8) -> torch.Tensor:
    """Calls quantize_block(i, block, inputs) block by block, feeding each block's outputs (after
    it was quantized) to the next; returns the final hidden states (n, T, C)."""
    x = model.embed(ids)
    for i, block in enumerate(model.layers):
        quantize_block(i, block, x)
        x = run_block(block, x, batch)
    return x


def hessians(modules: dict[str, nn.Linear], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / tokens of each module's inputs over one call of `run`."""
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
    count = {n: 0 for n in modules}

    def hook(name):
        def fn(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()  # (tokens, K)
            H[name] += 2 * x.T @ x
            count[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: H[n] / max(count[n], 1) for n in modules}


@QUANTIZERS.register(GPTQConfig)
def _gptq(model, cfg: GPTQConfig, calibration: torch.Tensor) -> None:
    targets = dict(target_linears(model, cfg.lm_head))

    def quantize_all(named: dict[str, nn.Linear], H: dict[str, torch.Tensor]) -> None:
        for name, m in named.items():
            w = m.weight.detach().float()
            grid = grid_for(name, w, layer_bits(cfg, name), cfg.group_size)
            q = gptq_quantize(w, H[name], grid, cfg.block_size, cfg.damp, cfg.act_order)
            set_layer(model, name, grid.module(q, m.bias))

    def per_block(i: int, block: nn.Module, x: torch.Tensor) -> None:
        named = {n: m for n, m in targets.items() if n.startswith(f"layers.{i}.")}
        local = {n[len(f"layers.{i}."):]: m for n, m in named.items()}
        H = hessians(local, lambda: run_block(block, x))
        quantize_all(named, {f"layers.{i}.{n}": h for n, h in H.items()})

    h = layerwise(model, calibration, per_block)
    if "lm_head" in targets:
        x = model.norm(h)
        H = 2 * (lambda f: f.T @ f)(x.reshape(-1, x.shape[-1]).float()) / (x.numel() // x.shape[-1])
        quantize_all({"lm_head": targets["lm_head"]}, {"lm_head": H})
