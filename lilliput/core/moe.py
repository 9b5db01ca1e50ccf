"""A mixture-of-experts feed-forward, registered as "moe": top-k routing over SwiGLU experts.

The router runs in float32 whatever the model's dtype (its softmax decides which expert runs, and
bfloat16 flips near-ties). Each token goes to its `moe_top_k` most probable experts, weighted by
their probabilities (renormalised over the k when k > 1 and `moe_norm_topk`, as Mixtral; with k = 1 the raw probability, as in
Switch, so the router still gets a gradient). Dropless by default: every expert takes every token
sent to it. With `moe_capacity` set, an expert takes at most capacity * tokens * k / experts tokens
per forward, in token order; the rest of its tokens are dropped (their other experts and the
residual still carry them) and counted in `dropped`.

After each forward the module keeps, for the trainer to read: `aux_loss` (balance_coef * Switch
load-balancing loss + z_coef * router z-loss, a tensor with its graph; computed in training mode
only, None in eval mode), `load` (tokens per expert, float, detached) and `dropped` (an int).
`moe_aux_loss(model)` sums the losses of every MoE layer.

Experts are ordinary `SwiGLU` modules with `nn.Linear` projections, so quantization and pruning
apply to them as to a dense model; the router is a plain parameter, not an `nn.Linear`, so they
leave it in float.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lilliput.core.config import ModelConfig
from lilliput.core.parts import FFNS, SwiGLU


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's loss: E * sum_e f_e P_e, with f_e the fraction of the (token, slot)
    assignments that went to expert e and P_e its mean router probability. probs (N, E), chosen
    (N, k) expert ids. It is 1 for a perfectly balanced router."""
    E = probs.shape[-1]
    f = torch.bincount(chosen.flatten(), minlength=E).to(probs.dtype) / chosen.numel()
    return E * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@FFNS.register("moe")
class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.E, self.k, self.capacity = config.moe_experts, config.moe_top_k, config.moe_capacity
        self.norm_topk = config.moe_norm_topk
        self.balance_coef, self.z_coef = config.moe_balance_coef, config.moe_z_coef
        self.router = nn.Parameter(torch.randn(self.E, config.dim) * 0.02)  # (E, C)
        self.experts = nn.ModuleList(SwiGLU(config) for _ in range(self.E))
        self.aux_loss: torch.Tensor | None = None
        self.load = torch.zeros(self.E, device="cpu")  # not meta when built by GPT.from_state_dict
        self.dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        N = x.shape[0]
        logits = x.float() @ self.router.float().t()  # (N, E) fp32
        probs = logits.softmax(-1)
        weight, chosen = probs.topk(self.k, dim=-1)  # (N, k)
        if self.k > 1 and self.norm_topk:
            weight = weight / weight.sum(-1, keepdim=True)
        self.aux_loss = self.balance_coef * load_balancing_loss(probs, chosen) + self.z_coef * router_z_loss(logits) \
            if self.training else None
        cap = N * self.k if self.capacity is None else math.ceil(self.capacity * N * self.k / self.E)
        out = torch.zeros_like(x)
        load = torch.zeros(self.E)
        dropped = 0
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # in token order
            if token.numel() > cap:
                dropped += token.numel() - cap
                token, slot = token[:cap], slot[:cap]
            load[e] = token.numel()
            if token.numel():
                y = expert(x[token]) * weight[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        self.load, self.dropped = load, dropped
        return out.view(shape)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every MoE layer's auxiliary loss from its last forward (a zero tensor for a dense
    model, or after an eval-mode forward):
    add it to the training loss."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    p = next(model.parameters(), None)  # none in eval mode (or a dense model): a zero the caller can .detach()
    return p.new_zeros(()) if p is not None else torch.zeros(())


def expert_load(model: nn.Module) -> list[list[float]]:
    """Per MoE layer, the fraction of routed tokens each expert took in the last forward."""
    return [(m.load / m.load.sum().clamp(min=1)).tolist() for m in moe_layers(model)]


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """What a trainer logs each step: the share of routed tokens each expert took (averaged over
    the MoE layers; 1 / experts each when balanced) and the tokens dropped by capacity limits."""
    layers = moe_layers(model)
    if not layers:
        return {}
    shares = torch.stack([m.load / m.load.sum().clamp(min=1) for m in layers]).mean(0)
    return {"moe_dropped": float(sum(m.dropped for m in layers)),
            **{f"moe_load_{e}": float(s) for e, s in enumerate(shares)}}

