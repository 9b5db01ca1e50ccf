"""Pure loss functions over logits: cross-entropy and the distillation divergences.

Every divergence takes student logits (B, T, V), a teacher given either as dense logits
(B, T, V) or as a `TopK` (its k most likely ids and their log-probabilities, from the logit
cache), an optional mask (B, T) of the positions that count, and a temperature. Each returns
the mean over counted positions of the per-position divergence, multiplied by T^2 as in
Hinton et al. (2015) so gradient magnitudes do not shrink as the temperature grows.

Definitions (P = teacher, Q = student, both softened by the temperature):

- forward KL  KL(P || Q)  (mode-covering; classic KD),
- reverse KL  KL(Q || P)  (mode-seeking; MiniLLM, Gu et al. 2024),
- generalized JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.
  This is GKD's definition (Agarwal et al. 2024) and that of TRL's `generalized_jsd_loss` and
  Liger's `LigerJSD`: beta is the teacher's weight in the mixture. The formula itself tends
  to 0 at both ends (JSD(beta) ~ beta KL(P||Q) as beta -> 0 and ~ (1-beta) KL(Q||P) as
  beta -> 1), so, as TRL does, beta = 0 is *defined* as forward KL and beta = 1 as reverse KL.
  beta = 0.5 is the ordinary (symmetric) Jensen-Shannon divergence.
- total variation  TVD = 1/2 sum |P - Q|  (bounded in [0, 1]; Wen et al. 2023 "f-divergence KD").

Top-k teachers. A cached teacher keeps only its k most likely tokens per position. Both
distributions are then compared over k + 1 outcomes: the k ids and one "rest" bucket holding
the remaining mass (for the teacher, 1 - the sum of its stored top-k probabilities; for the
student, 1 - the sum of its full-vocabulary probabilities at those ids). Renormalising both
over the k ids alone would leave the student's mass outside the teacher's top k
unconstrained (a student could put 90% of its mass there at zero loss, and its perplexity
explodes); the rest bucket ties it to the teacher's tail. This coarse-graining is exact at the
k ids, is zero for identical models, and by the data-processing inequality never exceeds the
full-vocabulary divergence. The temperature softens the k + 1 outcome distributions
(log-probs / T, renormalised) identically for teacher and student.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_EPS = 1e-6  # floor of the rest bucket's probability (fp16 top-k sums can round to >= 1)


class TopK(NamedTuple):
    """A teacher's top-k distribution at every position."""

    ids: torch.Tensor
    """(B, T, k) token ids, int64."""
    logprobs: torch.Tensor
    """(B, T, k) full-vocabulary log-probabilities of those ids at temperature 1."""


Teacher = torch.Tensor | TopK


# --- helpers ----------------------------------------------------------------------------------

def _rest(logp_k: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(logp_k)) over the last dim, floored at log(_EPS): (..., 1)."""
    covered = torch.logsumexp(logp_k, dim=-1, keepdim=True).clamp(max=math.log1p(-_EPS))
    return torch.log(-torch.expm1(covered))


def log_distributions(student_logits: torch.Tensor, teacher: Teacher,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Q, log P) over the same outcomes, softened by `temperature`, both (B, T, K).

    Dense teacher: K = V. Top-k teacher: K = k + 1 (the k ids and the rest bucket).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits.float()
    if isinstance(teacher, TopK):
        log_q_full = F.log_softmax(s, dim=-1)  # (B, T, V)
        log_q = log_q_full.gather(-1, teacher.ids.long())  # (B, T, k)
        log_p = teacher.logprobs.float()
        log_q = torch.cat([log_q, _rest(log_q)], dim=-1)  # (B, T, k+1)
        log_p = torch.cat([log_p, _rest(log_p)], dim=-1)
        if temperature != 1.0:
            log_q = F.log_softmax(log_q / temperature, dim=-1)
            log_p = F.log_softmax(log_p / temperature, dim=-1)
        return log_q, log_p
    if teacher.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(s.shape)} differ in shape")
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(teacher.float() / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) per position: (B, T). 0 log 0 counts as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T) values over positions where mask is true (all when None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


# --- losses -----------------------------------------------------------------------------------

def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats). logits (B, T, V) predict targets (B, T)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
    return masked_mean(nll.view(targets.shape), mask)


def forward_kl(student_logits: torch.Tensor, teacher: Teacher, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean KL(P_teacher || Q_student)."""
    log_q, log_p = log_distributions(student_logits, teacher, temperature)
    return temperature**2 * masked_mean(_kl(log_p, log_q), mask)


def reverse_kl(student_logits: torch.Tensor, teacher: Teacher, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean KL(Q_student || P_teacher) (MiniLLM's objective, token-level)."""
    log_q, log_p = log_distributions(student_logits, teacher, temperature)
    return temperature**2 * masked_mean(_kl(log_q, log_p), mask)


def generalized_jsd(student_logits: torch.Tensor, teacher: Teacher, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """T^2 * mean JSD(beta); beta is the teacher's weight in the mixture (0: forward KL, 1: reverse KL)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_q, log_p = log_distributions(student_logits, teacher, temperature)
    if beta == 0.0:
        div = _kl(log_p, log_q)
    elif beta == 1.0:
        div = _kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        div = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return temperature**2 * masked_mean(div, mask)


def total_variation(student_logits: torch.Tensor, teacher: Teacher, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean 1/2 sum |P - Q|."""
    log_q, log_p = log_distributions(student_logits, teacher, temperature)
    tvd = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # (B, T)
    return temperature**2 * masked_mean(tvd, mask)


DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": generalized_jsd, "tvd": total_variation}


def divergence(name: str, student_logits: torch.Tensor, teacher: Teacher, mask: torch.Tensor | None = None,
               temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """The divergence called `name` (fkl, rkl, jsd, tvd); beta is used by jsd only."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if name == "jsd":
        return generalized_jsd(student_logits, teacher, mask, temperature, beta)
    return DIVERGENCES[name](student_logits, teacher, mask, temperature)
