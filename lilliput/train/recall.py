"""Multi-query associative recall (MQAR), the synthetic task of Zoology (Arora et al. 2023,
"Zoology: Measuring and Improving Recall in Efficient Language Models"), sized for a CPU.

A sequence first lists `n_pairs` key-value pairs, then queries every key once (in a random order, at
random even offsets of the rest of the sequence, filler tokens in between), each query followed by
its value:

    k1 v1 k2 v2 ... kn vn | 0 0 k3 v3 0 0 k1 v1 k2 v2 ...

Keys come from the lower half of the vocabulary and values from the upper half (token 0 is the
filler), each drawn without replacement within a sequence. A model is scored only where the next
token is a queried value: it must have kept the whole key -> value map of the first part. An
attention layer looks the key up in its cache; a fixed-size recurrent state must have compressed
every pair into itself, which fails once the pairs outgrow the state (the paper's finding).

`recall_batch` is a pure function of (config, seed, index): batch `index` of a training run is the
same on every call. It returns {"idx": (B, seq_len + 1), "mask": (B, seq_len)}, the shape that
`train.loop.LanguageModeling` trains on (cross-entropy only where mask is true). `QueriedValues` is the
same loss computing the output layer only at the queried positions (a few rows of a large vocabulary);
`RecallMixture` cycles over several pair counts, as Zoology trains one model for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RecallConfig:
    vocab_size: int = 512
    """Token ids: 0 is the filler, keys are 1 .. vocab_size/2 - 1, values vocab_size/2 .. vocab_size - 1."""
    seq_len: int = 128
    """Input tokens per sequence (the pairs, then the queries)."""
    n_pairs: int = 16
    """Key-value pairs per sequence, each queried once: 4 * n_pairs must fit in seq_len."""
    batch_size: int = 32
    """Sequences per batch."""

    def __post_init__(self):
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if 4 * self.n_pairs > self.seq_len:
            raise ValueError(f"{self.n_pairs} pairs and their queries need seq_len >= {4 * self.n_pairs}, "
                             f"got {self.seq_len}")
        if self.vocab_size // 2 - 1 < self.n_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} holds fewer than {self.n_pairs} distinct keys: "
                             f"pass vocab_size >= {2 * self.n_pairs + 2}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def recall_batch(cfg: RecallConfig, seed: int, index: int = 0) -> dict[str, torch.Tensor]:
    """Batch `index` of the MQAR stream `seed`: {"idx": (B, seq_len+1), "mask": (B, seq_len)};
    mask[b, t] is true where idx[b, t+1] is the value of the key at idx[b, t] in the query part."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    B, T, n, half = cfg.batch_size, cfg.seq_len, cfg.n_pairs, cfg.vocab_size // 2
    keys = torch.rand(B, half - 1, generator=g).argsort(-1)[:, :n] + 1  # (B, n) distinct keys in 1..half-1
    values = torch.rand(B, cfg.vocab_size - half, generator=g).argsort(-1)[:, :n] + half  # (B, n)
    idx = torch.zeros(B, T + 1, dtype=torch.long)
    idx[:, 0:2 * n:2], idx[:, 1:2 * n:2] = keys, values
    # queries: n of the (T + 1 - 2n) // 2 even slots after the pairs, chosen at random, in order
    slots = (T + 1 - 2 * n) // 2
    chosen = torch.rand(B, slots, generator=g).argsort(-1)[:, :n].sort(-1).values  # (B, n)
    qpos = 2 * n + 2 * chosen  # (B, n): position of each query's key
    order = torch.rand(B, n, generator=g).argsort(-1)  # which pair each query asks for
    rows = torch.arange(B)[:, None]
    idx[rows, qpos] = keys.gather(1, order)
    idx[rows, qpos + 1] = values.gather(1, order)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[rows, qpos] = True  # input position qpos (the key) predicts qpos + 1 (its value)
    return {"idx": idx, "mask": mask}


class RecallBatches:
    """`recall_batch` as a data source for `Trainer`: batch `index` of stream `seed`."""

    def __init__(self, cfg: RecallConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        return recall_batch(self.cfg, self.seed, index)


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, cfg: RecallConfig, batches: int = 4, seed: int = 10_000) -> float:
    """Share of queried values `model` predicts exactly (greedy), over `batches` fresh batches of
    stream `seed` (pick one the training stream never uses)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    try:
        for i in range(batches):
            b = {k: v.to(device) for k, v in recall_batch(cfg, seed, i).items()}
            pred = model(b["idx"][:, :-1]).argmax(-1)  # (B, T)
            hit = (pred == b["idx"][:, 1:]) & b["mask"]
            right += int(hit.sum())
            total += int(b["mask"].sum())
    finally:
        model.train(was_training)
    return right / total


class RecallMixture:
    """Batches of several MQAR configs (pair counts) for `Trainer`: batch `index` is `recall_batch` of
    configs[index % len(configs)] (stream `seed`), except the first `warm_steps`, which all use configs[0]
    (a curriculum: the lookup is found on the shortest sequences, then kept as the pairs grow)."""

    def __init__(self, configs: tuple[RecallConfig, ...] | list[RecallConfig], seed: int = 0, warm_steps: int = 0):
        if not configs:
            raise ValueError("RecallMixture needs at least one RecallConfig")
        if warm_steps < 0:
            raise ValueError(f"warm_steps must be >= 0, got {warm_steps}")
        self.configs, self.seed, self.warm_steps = tuple(configs), seed, warm_steps

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        cfg = self.configs[0] if index < self.warm_steps else self.configs[index % len(self.configs)]
        return recall_batch(cfg, self.seed, index)


class QueriedValues(nn.Module):
    """Cross-entropy of `model` (a GPT: `features` then `logits`) at the queried positions of an MQAR
    batch, the output layer computed only there: the loss of `LanguageModeling` with the mask, at a
    fraction of its cost when the vocabulary is large."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx, mask = batch["idx"], batch["mask"]
        h = self.model.features(idx[:, :-1])[mask]  # (Q, C): the queried positions only
        loss = F.cross_entropy(self.model.logits(h), idx[:, 1:][mask])
        return loss, {"ce": loss.detach()}


@torch.no_grad()
def recall_hits(model: nn.Module, cfg: RecallConfig, sequences: int, seed: int) -> list[float]:
    """Per sequence, the share of its queried values `model` (a GPT) predicts exactly (greedy), over the
    first `sequences` sequences of stream `seed` (batches of cfg.batch_size; pick a stream training never
    uses). The output layer is computed at the queried positions only."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    try:
        for i in range((sequences + cfg.batch_size - 1) // cfg.batch_size):
            b = {k: v.to(device) for k, v in recall_batch(cfg, seed, i).items()}
            idx, mask = b["idx"], b["mask"]
            hit = torch.zeros_like(mask)
            hit[mask] = model.logits(model.features(idx[:, :-1])[mask]).argmax(-1) == idx[:, 1:][mask]
            out += (hit.sum(1) / mask.sum(1)).tolist()
    finally:
        model.train(was_training)
    return out[:sequences]
