"""AWQ-style activation-aware scaling (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization"), as in the reference `auto_scale` search.

A few input channels carry large activations; their weights matter most. Per linear layer with
inputs X: s = mean|X|^alpha per input channel (normalised by sqrt(max s * min s)), W' = W * s
is rounded to the grid and the layer computes (X / s) W'^T. alpha in [0, 1] is grid-searched
to minimise the layer's output error on calibration tokens (alpha = 0 is plain rounding, so the
search never does worse than RTN on them). 1/s is folded into what produces X, so the model
computes the same function before rounding:
  wqkv      <- attn_norm weight,   w_gate_up <- ffn_norm weight,
  w_down    <- the up-projection rows (and biases) of w_gate_up (of each expert in MoE),
  lm_head   <- the final norm weight.
A (1 + w) norm (Gemma) folds into 1 + w. wo (after attention) is rounded plainly; so are wqkv without
a pre-norm (OLMo 2) and MoE experts' w_gate_up (their norm also feeds the router, left in float). Biases
are unchanged by the scaling and kept. The weight-clipping search of the reference is not done.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lilliput.compress.gptq import layerwise, run_block
from lilliput.compress.grid import grid_for, layer_bits, target_linears
from lilliput.compress.qconfig import QUANTIZERS, AWQConfig
from lilliput.core.layers import set_layer


def search_scale(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, grid: int, name: str = "layer") -> torch.Tensor:
    """The per-input-channel scale s (K,) minimising |x W^T - x (Q(W s) / s)^T|^2 over alpha."""
    w, x = w.float(), x.float()
    ref = x @ w.T  # (tokens, N)
    mean = x.abs().mean(0).clamp(min=1e-8)  # (K,)
    best, best_s = float("inf"), torch.ones_like(mean)
    for alpha in torch.linspace(0, 1, grid).tolist() if grid > 1 else [0.5]:
        s = mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        ws = w * s
        wq = grid_for(name, ws, bits, group).fake(ws) / s
        err = (x @ wq.T - ref).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


def _subsample(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


def _capture(modules: dict[str, nn.Module], run) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: seen[n].append(inp[0].detach()))
             for n, m in modules.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in seen.items()}


def _fold_norm(norm, s: torch.Tensor) -> None:
    """Divide what an RMSNorm applies, offset + weight (Gemma's 1 + w), by s."""
    norm.weight.data = (norm.offset + norm.weight.data) / s - norm.offset


def _fold_up(mlp, s: torch.Tensor) -> None:
    """Divide the up-projection's outputs (rows, and their biases) by s: act(gate) * up / s feeds w_down."""
    f = mlp.ffn_dim
    mlp.w_gate_up.weight.data[f:].div_(s[:, None])
    if mlp.w_gate_up.bias is not None:
        mlp.w_gate_up.bias.data[f:].div_(s)


def _swiglus(block) -> list[str]:
    """Prefixes ("ffn." or "ffn.experts.3.") of the gated MLPs of a block."""
    from lilliput.core.model import SwiGLU

    return [n + "." for n, m in block.named_modules() if isinstance(m, SwiGLU)]


@QUANTIZERS.register(AWQConfig)
def _awq(model, cfg: AWQConfig, calibration: torch.Tensor) -> None:
    targets = dict(target_linears(model, cfg.lm_head))

    def scale_(name: str, x: torch.Tensor, fold) -> None:
        """Search s for layer `name`, multiply its columns by s and divide the producer by s."""
        m = model.get_submodule(name)
        s = search_scale(m.weight, x, layer_bits(cfg, name), cfg.group_size, cfg.grid, name)
        m.weight.data = m.weight.data * s  # a fresh tensor: a tied embedding keeps its values
        fold(s)

    def per_block(i: int, block: nn.Module, x: torch.Tensor) -> None:
        p = f"layers.{i}."
        local = {n[len(p):]: m for n, m in targets.items() if n.startswith(p)}
        feats = {n: _subsample(v, cfg.max_tokens, i) for n, v in
                 _capture(local, lambda: run_block(block, x)).items()}
        if "mixer.wqkv" in feats and hasattr(block, "attn_norm"):  # no pre-norm (OLMo 2): nothing to fold into
            scale_(p + "mixer.wqkv", feats["mixer.wqkv"], lambda s: _fold_norm(block.attn_norm, s))
        if "ffn.w_gate_up" in feats and hasattr(block, "ffn_norm"):  # MoE: the norm also feeds the router
            scale_(p + "ffn.w_gate_up", feats["ffn.w_gate_up"], lambda s: _fold_norm(block.ffn_norm, s))
        for e in _swiglus(block):  # the dense MLP, or each expert
            if f"{e}w_down" in feats and f"{e}w_gate_up" in local:
                scale_(p + f"{e}w_down", feats[f"{e}w_down"], lambda s, e=e: _fold_up(block.get_submodule(e[:-1]), s))
        for n, m in local.items():
            w = m.weight.detach().float()
            set_layer(model, p + n, grid_for(p + n, w, layer_bits(cfg, p + n), cfg.group_size).module(w, m.bias))

    h = layerwise(model, calibration, per_block)
    if "lm_head" in targets:
        x = _subsample(model.norm(h), max(cfg.max_tokens // 8, 64))
        head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        head.weight.data = model.lm_head.weight.detach().float().clone()  # untie before scaling
        model.lm_head = head
        scale_("lm_head", x, lambda s: _fold_norm(model.norm, s))
        w = model.lm_head.weight.detach()
        model.lm_head = grid_for("lm_head", w, layer_bits(cfg, "lm_head"), cfg.group_size).module(w)
