"""The GPT scale of the collapse lab: its sizes, its learner, and the work it will do.

Byte-level GPTs of ~1M parameters trained from scratch on pieces of the default corpus with the
Trainer, sampled through the Engine (one row per document, a seed per document), pure
(temperature 1) and top-p.

Under replace each generation's training set has the size of the human one (as in Shumailov et
al. 2024); under accumulate it grows by the human set's size every generation, and under fraction
it is twice the human set. Generation 0 trains for `train.max_tokens` (--train-tokens); a later
generation's token budget follows `budget`:

- "epochs" (the default; Gerstgrasser et al. 2024): every generation makes as many passes over
  its training set as generation 0 made over the human set, so it trains for
  train.max_tokens * len(training set) / len(human set) tokens: accumulate's generation g trains
  (g+1) times as long as generation 0, fraction's twice, replace's the same (compute grows with
  the data);
- "tokens" (Kazdan et al. 2024's "accumulate-subsample"): every generation trains for
  train.max_tokens whatever its training set, so under accumulate the human share of what a model
  sees falls to 1/(g+1).

`work()` and `estimate_seconds()` count the grown budgets. Perplexity is measured on held-out
human pieces (never trained on) with windows of the training length.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.options import nested
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.data.ledger import SelectionConfig, mix_sizes, model_fingerprint
from lilliput.eval.perplexity import PerplexityConfig, perplexity
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.train.collapse import POLICIES, Sampling, samplings
from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches


BUDGETS = ("epochs", "tokens")


@dataclass(frozen=True)
class CollapseConfig:
    """The lab's sizes. Defaults: the full run (~80 minutes on one core); QUICK: seconds."""

    generations: int = 5
    """Generations per chain, generation 0 (trained on human text) included."""
    seeds: int = 3
    """Independent chains per policy and sampling (the spread)."""
    policies: tuple[str, ...] = ("replace", "accumulate", "fraction")
    """Training-set policies (replace, accumulate, fraction)."""
    human_fraction: float = SelectionConfig.human_fraction
    """Share of human documents under the fraction policy."""
    samplings: tuple[str, ...] = ("pure", "top_p")
    """pure: temperature 1; top_p: temperature 1 within the top_p nucleus."""
    top_p: float = 0.9
    """Nucleus of the top_p sampling."""
    documents: int = 400
    """Human training documents, and documents each generation writes (a small set trained on for
    several epochs: the data-limited regime of the papers, where the policies differ)."""
    doc_bytes: int = 112
    """Bytes per document (human pieces; new tokens per synthetic one)."""
    prompt_bytes: int = 16
    """Opening of a parent document that a synthetic one continues (not part of it)."""
    heldout_documents: int = 200
    """Held-out human pieces for perplexity and the text measures."""
    dim: int = 128
    """GPT width."""
    n_layers: int = 6
    """GPT blocks."""
    n_heads: int = 4
    """GPT query heads."""
    n_kv_heads: int = 2
    """GPT key/value heads."""
    ffn_dim: int = 344
    """GPT feed-forward width."""
    seq_len: int = 128
    """Training window (and perplexity window, and the longest prompt + document)."""
    batch_size: int = 16
    """Windows per training step."""
    train: TrainConfig = field(default=TrainConfig(lr=3e-3, max_tokens=150_000), metadata=nested(
        only=("lr", "warmup_steps", "max_tokens"), names={"max_tokens": "train_tokens"},
        help={"max_tokens": "Tokens generation 0 trains on (a later one: see budget)."}))
    """How every GPT trains, from scratch: lr, warmup, and max_tokens (--train-tokens), the tokens
    generation 0 trains on over the human set (~3.3 epochs of 400 x 112 bytes). Under budget="epochs"
    a later generation trains max_tokens * len(its training set) / documents (accumulate's generation g:
    (g+1) x max_tokens); under budget="tokens", max_tokens each. Each run sets its own seed."""
    budget: str = "epochs"
    """GPT token budget per generation: epochs (the same passes over whatever the policy selected as
    generation 0 made over the human set: Gerstgrasser et al. 2024) or tokens (train.max_tokens every
    generation: Kazdan et al. 2024's accumulate-subsample)."""
    max_batch: int = 64
    """Engine rows: documents written together."""
    full_corpus: bool = True
    """Use the fetched corpus when present (off: the shipped sample)."""
    ngram_documents: int = 300
    """Bigram scale: human training pieces (and documents per generation)."""
    ngram_words: int = 40
    """Bigram scale: words per piece."""
    gaussian_samples: int = 50
    """Gaussian scale: draws per generation."""
    gaussian_generations: int = 50
    """Gaussian scale: generations (a variance drifts slowly: it needs many)."""
    watermark_documents: int = 100
    """Watermarked documents (and as many human ones) in the scraped set; 0 skips the watermark loop."""
    watermark_delta: float = 2.0
    """Watermark strength (green-list logit bias); gamma and the z threshold are WatermarkConfig's."""
    threads: int | None = None
    """Torch threads (None: torch's default)."""

    def __post_init__(self):
        if self.generations < 2:
            raise ValueError(f"generations must be >= 2 (0 is the human one), got {self.generations}")
        if self.seeds < 1 or self.documents < 1 or self.heldout_documents < 1:
            raise ValueError("seeds, documents and heldout_documents must be >= 1")
        if self.prompt_bytes < 1 or self.prompt_bytes + self.doc_bytes > self.seq_len:
            raise ValueError(f"prompt_bytes + doc_bytes ({self.prompt_bytes} + {self.doc_bytes}) must fit in "
                             f"seq_len={self.seq_len}: lower doc_bytes or raise seq_len")
        samplings(self.samplings, self.top_p)  # checks the names
        bad = [p for p in self.policies if p not in POLICIES]
        if bad or not self.policies:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {', '.join(self.policies) or 'none'}")
        if not 0 < self.human_fraction < 1:
            raise ValueError(f"human_fraction must be in (0, 1), got {self.human_fraction}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")

    def generation_tokens(self, train_documents: int) -> int:
        """Tokens a generation trains on, from the documents in its training set (pieces of equal length)."""
        if self.budget == "tokens":
            return self.train.max_tokens
        return round(self.train.max_tokens * train_documents / self.documents)

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=256, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len,
                           name="collapse-lab")


QUICK = CollapseConfig(generations=3, seeds=1, documents=24, doc_bytes=48, heldout_documents=16, dim=32, n_layers=2,
                       ffn_dim=64, seq_len=64, batch_size=8,
                       train=dataclasses.replace(CollapseConfig().train, max_tokens=8 * 64 * 12, warmup_steps=2),
                       max_batch=24, full_corpus=False, ngram_documents=40, ngram_words=20, gaussian_generations=20,
                       watermark_documents=8)
"""`--quick`: tiny models on the shipped sample, 3 generations, 1 seed (seconds; the figures mean little)."""


class GPTLearner:
    """The GPT scale of the lab: fit = train from scratch, sample = the engine, perplexity = held-out windows."""

    def __init__(self, cfg: CollapseConfig, heldout: list[str], device: str = "cpu"):
        self.cfg, self.device, self.tok = cfg, device, ByteTokenizer()
        self.model_cfg = cfg.model_config()
        self.heldout = "\n".join(heldout)

    def fit(self, texts: list[str], seed: int) -> GPT:
        c = self.cfg
        stream = torch.tensor(self.tok.encode("\n".join(texts)), dtype=torch.long)
        torch.manual_seed(seed)
        model = GPT(self.model_cfg).to(self.device)
        train = dataclasses.replace(c.train, max_tokens=c.generation_tokens(len(texts)), seed=seed, progress=False)
        Trainer(LanguageModeling(model), WindowBatches(stream, c.batch_size, c.seq_len, seed), train).fit()
        return model.eval()

    def perplexity(self, model: GPT) -> float:
        return perplexity(model, self.tok, self.heldout, PerplexityConfig(window=self.cfg.seq_len, batch_size=32))[
            "perplexity"]

    def fingerprint(self, model: GPT) -> str:
        return model_fingerprint(model)

    def sample(self, model: GPT, prompts: list[str], sampling: Sampling, seeds: list[int],
               processors: tuple = ()) -> list[str]:
        """One document of doc_bytes new tokens per prompt (its first prompt_bytes bytes), seeded per document."""
        c = self.cfg
        engine = Engine(model, self.tok, EngineConfig(max_batch=c.max_batch, max_len=c.prompt_bytes + c.doc_bytes,
                                                      prefix_cache=False))
        seqs = [engine.add(self.tok.encode(p)[:c.prompt_bytes] or [10],
                           GenerationConfig(max_new_tokens=c.doc_bytes, temperature=sampling.temperature,
                                            top_p=sampling.top_p, seed=s, ignore_eos=True), processors=processors)
                for p, s in zip(prompts, seeds)]
        engine.run()
        return [s.text for s in seqs]


# --- the duration, up front ---------------------------------------------------------------------

def train_documents(cfg: CollapseConfig, policy: str, generation: int) -> int:
    """Documents the ledger selects for `policy` at `generation` (each generation writes `documents`):
    replace the latest ones, accumulate all, fraction as `Ledger.select` mixes them."""
    human, synthetic = cfg.documents, generation * cfg.documents
    if generation == 0 or policy == "replace":
        return cfg.documents
    if policy == "accumulate":
        return human + synthetic
    return sum(mix_sizes(human, synthetic, cfg.human_fraction))


def work(cfg: CollapseConfig) -> dict[str, Any]:
    """Models trained, tokens trained (the budget rule's grown budgets) and documents written by the GPT scale."""
    S, P, G = len(cfg.samplings), len(cfg.policies), cfg.generations
    models = cfg.seeds * (1 + S * P * (G - 1))
    per_policy = {p: [cfg.generation_tokens(train_documents(cfg, p, g)) for g in range(G)] for p in cfg.policies}
    tokens = cfg.seeds * (cfg.train.max_tokens + S * sum(sum(t[1:]) for t in per_policy.values()))
    written = cfg.seeds * (S + S * P * (G - 1)) * cfg.documents + 2 * cfg.watermark_documents
    return {"models": models, "train_tokens": tokens, "train_tokens_per_generation": per_policy,
            "documents_written": written, "tokens_written": written * cfg.doc_bytes}


def estimate_seconds(cfg: CollapseConfig, device: str = "cpu") -> dict[str, float]:
    """Time the GPT scale will take here, from a few timed training steps and one engine batch."""
    train = dataclasses.replace(cfg.train, max_tokens=cfg.batch_size * cfg.seq_len * 4, warmup_steps=1)
    learner = GPTLearner(dataclasses.replace(cfg, train=train, budget="tokens"), ["x" * cfg.seq_len], device)
    text = "The lab measures its own speed before it starts. " * (cfg.seq_len // 8)
    learner.fit([text], seed=0)  # warm up
    t0 = time.perf_counter()
    model = learner.fit([text], seed=0)
    train_tps = cfg.batch_size * cfg.seq_len * 4 / (time.perf_counter() - t0)
    n = min(cfg.max_batch, 32)
    short = dataclasses.replace(cfg, doc_bytes=min(cfg.doc_bytes, 32))
    t0 = time.perf_counter()
    GPTLearner(short, ["x"], device).sample(model, [text] * n, Sampling("pure"), list(range(n)))
    gen_tps = n * short.doc_bytes / (time.perf_counter() - t0)
    w = work(cfg)
    train_s, gen_s = w["train_tokens"] / train_tps, w["tokens_written"] / gen_tps
    return {"train_tokens_per_s": round(train_tps), "write_tokens_per_s": round(gen_tps),
            "train_s": round(train_s), "write_s": round(gen_s), "total_s": round(1.1 * (train_s + gen_s))}
