"""Muon: momentum orthogonalized by Newton-Schulz, for the hidden matrices; AdamW for the rest.

Keller Jordan's optimizer from modded-nanogpt (github.com/KellerJordan/Muon): each step takes the
Nesterov momentum of a 2-D weight's gradient, replaces it by the nearest semi-orthogonal matrix
(5 quintic Newton-Schulz iterations, which push every singular value into roughly [0.7, 1.2]
rather than exactly 1), scales it by sqrt(max(1, rows / cols)) and subtracts lr times that.
Embeddings, the output layer, norm gains and biases are not hidden matrices: they train with
AdamW in the same optimizer (modded-nanogpt's split), so one learning-rate schedule, one
gradient clip and one state dict cover both.

    opt = Muon(muon_param_groups(model, muon_lr=0.02, adam_lr=3e-4, weight_decay=0.1))

Under FSDP2 a hidden matrix is a DTensor sharded by rows: its update is gathered, orthogonalized
whole (every rank computes the same matrix) and cut back to this rank's rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximately semi-orthogonal matrix U V^T with G = U S V^T: (..., m, n) -> same shape.

    `dtype` is the arithmetic (bfloat16 on CUDA in modded-nanogpt; float32 is the CPU default)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side: X X^T is the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def _orthogonalize(update: torch.Tensor, steps: int) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(update, DTensor):  # FSDP2 shard: orthogonalize the whole matrix, keep our rows
        whole = newton_schulz(update.full_tensor(), steps)
        return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
    return newton_schulz(update, steps)


def is_hidden_matrix(name: str, p: nn.Parameter, module: nn.Module) -> bool:
    """The 2-D weight of a linear layer other than the output layer (a Mamba convolution kernel
    or an MoE router is a 2-D parameter but not a linear map of the hidden state)."""
    return isinstance(module, nn.Linear) and p is module.weight and name.split(".")[-2:-1] != ["lm_head"]


def muon_param_groups(model: nn.Module, muon_lr: float, adam_lr: float, weight_decay: float = 0.0,
                      betas: tuple[float, float] = (0.9, 0.95)) -> list[dict]:
    """Parameter groups for `Muon`: hidden 2-D matrices under Muon; under AdamW the embeddings and
    output layer (decayed) and every parameter with fewer than 2 dimensions (not decayed)."""
    owner = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (f"{mod_name}.{p_name}" if mod_name else p_name, module))
    hidden, matrices, vectors = [], [], []
    for p in model.parameters():  # each shared (tied) parameter once
        if not p.requires_grad:
            continue
        name, module = owner[id(p)]
        (hidden if is_hidden_matrix(name, p, module) else matrices if p.dim() >= 2 else vectors).append(p)
    groups = [{"params": hidden, "use_muon": True, "lr": muon_lr, "weight_decay": weight_decay},
              {"params": matrices, "use_muon": False, "lr": adam_lr, "weight_decay": weight_decay, "betas": betas},
              {"params": vectors, "use_muon": False, "lr": adam_lr, "weight_decay": 0.0, "betas": betas}]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon on groups with use_muon=True, AdamW on the others (see the module docstring)."""

    def __init__(self, groups: list[dict], lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, use_muon=True)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    update = self._muon(p.grad, state, group)
                else:
                    update = self._adam(p.grad, state, group)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
        return loss

    @staticmethod
    def _muon(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf, beta = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - beta)
        update = grad.lerp(buf, beta) if group["nesterov"] else buf
        update = _orthogonalize(update, group["ns_steps"])
        return update * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5

    @staticmethod
    def _adam(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        (b1, b2), t = group["betas"], state["step"]
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].lerp_(grad.square(), 1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - b1 ** t) / denom
