"""The GPT scale of the collapse lab: its sizes, its tokenizer, its learner, and the work it will do.

Small GPTs trained from scratch with the Trainer on pieces of the default corpus, tokenized by a
byte-level BPE learnt from the human training set (fewer tokens per byte than bytes: cheaper to
train on and to write), and sampled through the Engine (one row per document, a seed per
document). Generation 0 trains for `train.max_tokens` (--train-tokens); a later generation's
token budget follows a budget rule, and both rules run by default (`budgets`):

- "tokens" (equal compute; Kazdan et al. 2024's accumulate-subsample): every generation trains for
  train.max_tokens whatever its training set, so under accumulate the human share of what a model
  sees falls to 1/(g+1);
- "epochs" (equal passes; Gerstgrasser et al. 2024): every generation makes as many passes over its
  training set as generation 0 made over the human set, train.max_tokens * len(set) / len(human
  set) tokens: accumulate's generation g trains (g+1) times as long as generation 0.

Under replace each generation's training set has the size of the human one (Shumailov et al.
2024), so both rules give it the same tokens: `chains()` runs it once and it is reported under
both. Generation 0 (its model and what it writes) is shared by every chain of a seed.

`work()` counts the models, tokens trained and tokens written; `estimate_seconds()` times a few
training steps, an engine batch and a perplexity pass here, one thread, and lays the tasks of the
study out on `workers` processes the way collapse_study.py schedules them.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.options import nested
from lilliput.core.tokenizer import ByteTokenizer, Tokenizer
from lilliput.data.ledger import SelectionConfig, mix_sizes, model_fingerprint
from lilliput.eval.perplexity import PerplexityConfig, perplexity
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.train.collapse import POLICIES, Sampling, samplings
from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches

BUDGETS = ("tokens", "epochs")
RULES = {"tokens": "equal tokens per generation (equal compute; Kazdan et al. 2024's accumulate-subsample)",
         "epochs": "equal passes over each generation's training set (Gerstgrasser et al. 2024)"}


@dataclass(frozen=True)
class CollapseConfig:
    """The lab's sizes. Defaults: the full run (bench/collapse.py, under an hour on 2 cores); QUICK: seconds."""

    generations: int = 5
    """Generations per chain, generation 0 (trained on human text) included."""
    seeds: int = 3
    """Independent chains per policy, budget rule and sampling (the spread)."""
    policies: tuple[str, ...] = ("replace", "accumulate")
    """Training-set policies (replace, accumulate, fraction; the full run leaves fraction out for time)."""
    human_fraction: float = SelectionConfig.human_fraction
    """Share of human documents under the fraction policy."""
    budgets: tuple[str, ...] = BUDGETS
    """Token budget rules of the GPT scale: tokens (equal compute) and epochs (equal passes)."""
    samplings: tuple[str, ...] = ("pure",)
    """pure: temperature 1; top_p: temperature 1 within the top_p nucleus (the full run writes pure only, for time)."""
    top_p: float = 0.9
    """Nucleus of the top_p sampling."""
    documents: int = 8000
    """Human training pieces (8,000 x 256 bytes: 2.05 MB); every generation but the last writes as many documents."""
    doc_bytes: int = 256
    """Bytes per human piece. A synthetic document has as many new tokens as a human piece has on average."""
    prompt_tokens: int = 4
    """Opening of a parent document (tokens) that a synthetic one continues (not part of it)."""
    metric_documents: int = 2000
    """Documents of each generation that the text measures read (the same number every generation; the last
    generation writes only these)."""
    heldout_documents: int = 400
    """Held-out human pieces for perplexity and the text measures."""
    vocab_size: int | None = 1024
    """Byte-level BPE learnt from the human training set (None: bytes, 256 ids)."""
    dim: int = 48
    """GPT width."""
    n_layers: int = 3
    """GPT blocks."""
    n_heads: int = 4
    """GPT query heads."""
    n_kv_heads: int = 2
    """GPT key/value heads."""
    ffn_dim: int = 128
    """GPT feed-forward width."""
    seq_len: int = 128
    """Training window (and perplexity window, and the longest prompt + document)."""
    batch_size: int = 32
    """Windows per training step."""
    train: TrainConfig = field(default=TrainConfig(lr=1e-2, optimizer="muon", muon_lr=0.03, schedule="wsd",
                                                   warmup_steps=20, max_tokens=1_000_000), metadata=nested(
        only=("lr", "muon_lr", "warmup_steps", "max_tokens"), names={"max_tokens": "train_tokens"},
        help={"max_tokens": "Tokens generation 0 trains on (a later one: see budgets)."}))
    """How every GPT trains, from scratch: Muon on the hidden matrices (AdamW at lr on embeddings and
    norms), warmup, a stable learning rate, then a linear decay over the last fifth (wsd); max_tokens
    (--train-tokens) is what generation 0 trains on over the human set. Each run sets its own seed."""
    curve_points: int = 10
    """Held-out perplexity evaluations along each generation 0's training (its curve)."""
    control_factor: float | None = 2.0
    """Seed 0's generation 0 trained again for this many times train.max_tokens: how much longer
    training still helps, the test of convergence (None: skip)."""
    max_batch: int = 256
    """Engine rows: documents written together."""
    workers: int = 2
    """Processes running the GPT scale's tasks at once (1: all in this process)."""
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
    threads: int | None = 1
    """Torch threads of each process (None: torch's default)."""

    def __post_init__(self):
        if self.generations < 2:
            raise ValueError(f"generations must be >= 2 (0 is the human one), got {self.generations}")
        if self.seeds < 1 or self.documents < 1 or self.heldout_documents < 1 or self.metric_documents < 1:
            raise ValueError("seeds, documents, heldout_documents and metric_documents must be >= 1")
        if self.prompt_tokens < 1 or self.prompt_tokens >= self.seq_len:
            raise ValueError(f"prompt_tokens must be in [1, seq_len={self.seq_len}), got {self.prompt_tokens}")
        samplings(self.samplings, self.top_p)  # checks the names
        bad = [p for p in self.policies if p not in POLICIES]
        if bad or not self.policies:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {', '.join(self.policies) or 'none'}")
        if not 0 < self.human_fraction < 1:
            raise ValueError(f"human_fraction must be in (0, 1), got {self.human_fraction}")
        bad = [b for b in self.budgets if b not in BUDGETS]
        if bad or not self.budgets:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {', '.join(self.budgets) or 'none'}")
        if self.vocab_size is not None and self.vocab_size <= 256:
            raise ValueError(f"vocab_size must exceed 256 (or be None for bytes), got {self.vocab_size}")
        if self.workers < 1 or self.curve_points < 1:
            raise ValueError(f"workers and curve_points must be >= 1, got {self.workers} and {self.curve_points}")
        if self.control_factor is not None and self.control_factor <= 1:
            raise ValueError(f"control_factor must be > 1 (or None), got {self.control_factor}")

    def generation_tokens(self, budget: str, train_documents: int) -> int:
        """Tokens a generation trains on under `budget`, from the documents in its training set."""
        if budget == "tokens":
            return self.train.max_tokens
        return round(self.train.max_tokens * train_documents / self.documents)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size or self.vocab_size or 256, dim=self.dim, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim,
                           max_seq_len=self.seq_len, name="collapse-lab")


QUICK = CollapseConfig(generations=3, seeds=1, policies=("replace", "accumulate", "fraction"), documents=24,
                       doc_bytes=64, metric_documents=16, heldout_documents=16, vocab_size=320, dim=32, n_layers=2,
                       ffn_dim=64, seq_len=64, batch_size=8,
                       train=dataclasses.replace(CollapseConfig().train, max_tokens=8 * 64 * 12, warmup_steps=2),
                       curve_points=3, max_batch=24, workers=1, full_corpus=False, ngram_documents=40,
                       ngram_words=20, gaussian_generations=20, watermark_documents=8)
"""`--quick`: tiny models on the shipped sample, 3 generations, 1 seed, one process (seconds; the figures mean little)."""


def lab_tokenizer(cfg: CollapseConfig, human: list[str]) -> Tokenizer | ByteTokenizer:
    """The GPT scale's tokenizer: a BPE of cfg.vocab_size learnt from the human training texts, or bytes."""
    return ByteTokenizer() if cfg.vocab_size is None else Tokenizer.train_bpe(human, cfg.vocab_size)


def doc_tokens(tokenizer, human: list[str]) -> int:
    """New tokens per synthetic document: the mean tokens of a human piece, so that a generation
    writes as many tokens as the human set holds."""
    return max(1, round(sum(len(ids) for ids in tokenizer.encode_batch(human, bos=False)) / len(human)))


class GPTLearner:
    """The GPT scale of the lab: fit = train from scratch for the budget rule's tokens, sample = the
    engine, perplexity = held-out windows. `curve` holds the held-out perplexity along the last fit
    that asked for it."""

    def __init__(self, cfg: CollapseConfig, tokenizer, heldout: list[str], new_tokens: int, budget: str = "tokens",
                 device: str = "cpu"):
        if cfg.prompt_tokens + new_tokens > cfg.seq_len:
            raise ValueError(f"prompt_tokens + tokens per document ({cfg.prompt_tokens} + {new_tokens}) must fit in "
                             f"seq_len={cfg.seq_len}: lower doc_bytes or raise seq_len")
        self.cfg, self.tok, self.device, self.budget, self.new_tokens = cfg, tokenizer, device, budget, new_tokens
        self.model_cfg = cfg.model_config(tokenizer.vocab_size)
        self.heldout = "\n".join(heldout)
        self.curve: list[dict[str, float]] = []

    def fit(self, texts: list[str], seed: int, tokens: int | None = None, curve: bool = False) -> GPT:
        """A GPT trained from scratch on `texts` for `tokens` (default: the budget rule's, from len(texts))."""
        c = self.cfg
        stream = torch.tensor(self.tok.encode("\n".join(texts), bos=False), dtype=torch.long)
        torch.manual_seed(seed)
        model = GPT(self.model_cfg).to(self.device)
        tokens = tokens or c.generation_tokens(self.budget, len(texts))
        steps = -(-tokens // (c.batch_size * c.seq_len))
        train = dataclasses.replace(c.train, max_tokens=tokens, seed=seed, progress=False,
                                    eval_every=max(1, steps // c.curve_points) if curve else None)
        points: list[dict[str, float]] = []

        def evaluate(_objective) -> dict[str, float]:
            points.append({"tokens": trainer.tokens, "perplexity": self.perplexity(model)})
            return {"perplexity": points[-1]["perplexity"]}

        trainer = Trainer(LanguageModeling(model), WindowBatches(stream, c.batch_size, c.seq_len, seed), train,
                          evaluate=evaluate if curve else None)
        trainer.fit()
        if curve:
            self.curve = points
        return model.eval()

    def perplexity(self, model: GPT) -> float:
        return perplexity(model, self.tok, self.heldout, PerplexityConfig(window=self.cfg.seq_len, batch_size=32))[
            "perplexity"]

    def fingerprint(self, model: GPT) -> str:
        return model_fingerprint(model)

    def sample(self, model: GPT, prompts: list[str], sampling: Sampling, seeds: list[int],
               processors: tuple = ()) -> list[str]:
        """One document of `new_tokens` tokens per prompt (its first prompt_tokens tokens), seeded per document."""
        c = self.cfg
        engine = Engine(model, self.tok, EngineConfig(max_batch=c.max_batch, max_len=c.prompt_tokens + self.new_tokens,
                                                      prefix_cache=False))
        newline = self.tok.encode("\n", bos=False)
        seqs = [engine.add(self.tok.encode(p, bos=False)[:c.prompt_tokens] or newline,
                           GenerationConfig(max_new_tokens=self.new_tokens, temperature=sampling.temperature,
                                            top_p=sampling.top_p, seed=s, ignore_eos=True), processors=processors)
                for p, s in zip(prompts, seeds)]
        engine.run()
        return [s.text for s in seqs]


# --- the work, up front -------------------------------------------------------------------------

def train_documents(cfg: CollapseConfig, policy: str, generation: int) -> int:
    """Documents the ledger selects for `policy` at `generation` (each generation writes `documents`):
    replace the latest ones, accumulate all, fraction as `Ledger.select` mixes them."""
    human, synthetic = cfg.documents, generation * cfg.documents
    if generation == 0 or policy == "replace":
        return cfg.documents
    if policy == "accumulate":
        return human + synthetic
    return sum(mix_sizes(human, synthetic, cfg.human_fraction))


def budget_tokens(cfg: CollapseConfig, policy: str, budget: str) -> list[int]:
    """Tokens each generation of a chain trains on (generation 0 first)."""
    return [cfg.generation_tokens(budget, train_documents(cfg, policy, g)) for g in range(cfg.generations)]


def chains(cfg: CollapseConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The chains to run per seed and sampling: (policy, the budget rules it stands for). Rules that
    give a policy the same tokens every generation share one chain (replace: always)."""
    out = []
    for p in cfg.policies:
        by_tokens: dict[tuple[int, ...], list[str]] = {}
        for b in cfg.budgets:
            by_tokens.setdefault(tuple(budget_tokens(cfg, p, b)), []).append(b)
        out += [(p, tuple(bs)) for bs in by_tokens.values()]
    return out


def work(cfg: CollapseConfig, new_tokens: int = 0) -> dict[str, Any]:
    """Models trained, tokens trained and documents (tokens) written by the GPT scale, per seed and in all."""
    S, G, N = len(cfg.samplings), cfg.generations, cfg.documents
    M = min(N, cfg.metric_documents)
    per_chain = [sum(budget_tokens(cfg, p, bs[0])[1:]) for p, bs in chains(cfg)]
    control = round(cfg.control_factor * cfg.train.max_tokens) if cfg.control_factor else 0
    models = cfg.seeds * (1 + S * len(per_chain) * (G - 1)) + (1 if control else 0)
    tokens = cfg.seeds * (cfg.train.max_tokens + S * sum(per_chain)) + control
    written = cfg.seeds * S * (N + len(per_chain) * ((G - 2) * N + M)) + 2 * cfg.watermark_documents
    return {"models": models, "chains_per_seed": S * len(per_chain), "train_tokens": tokens,
            "train_tokens_per_generation": {f"{p}/{b}": budget_tokens(cfg, p, b) for p, bs in chains(cfg) for b in bs},
            "control_tokens": control, "documents_written": written, "tokens_written": written * new_tokens}


def tasks(cfg: CollapseConfig) -> list[tuple[str, ...]]:
    """The GPT scale's tasks, in the order they are started when free: every seed's generation 0, then
    its chains (the longest first), then the control. ("first", seed), ("chain", seed, sampling, policy,
    budgets...), ("control",)."""
    out: list[tuple[str, ...]] = [("first", str(s)) for s in range(cfg.seeds)]
    by_length = sorted(chains(cfg), key=lambda c: -sum(budget_tokens(cfg, c[0], c[1][0])))
    out += [("chain", str(s), sp, p, *bs) for s in range(cfg.seeds) for p, bs in by_length for sp in cfg.samplings]
    return out + ([("control",)] if cfg.control_factor else [])


def task_seconds(cfg: CollapseConfig, task: tuple[str, ...], rates: dict[str, float], new_tokens: int) -> float:
    """A task's duration from the measured rates (train and write tokens per second, seconds per perplexity)."""
    N, M, G = cfg.documents, min(cfg.documents, cfg.metric_documents), cfg.generations
    T, train, write, ppl = cfg.train.max_tokens, rates["train"], rates["write"], rates["perplexity_s"]
    if task[0] == "first":
        return T / train + len(cfg.samplings) * N * new_tokens / write + (cfg.curve_points + 1) * ppl
    if task[0] == "control":
        return cfg.control_factor * T / train + (cfg.curve_points + 1) * ppl
    tokens = sum(budget_tokens(cfg, task[3], task[4])[1:])
    return tokens / train + ((G - 2) * N + M) * new_tokens / write + (G - 1) * ppl


def layout(cfg: CollapseConfig, seconds: dict[tuple[str, ...], float]) -> float:
    """Wall seconds of the tasks on cfg.workers processes, started in `tasks` order as workers free up
    (a seed's chains wait for its generation 0)."""
    free = [0.0] * cfg.workers
    first_done: dict[str, float] = {}
    for t in tasks(cfg):
        start = heapq.heappop(free)
        if t[0] == "chain":
            start = max(start, first_done[t[1]])
        end = start + seconds[t]
        if t[0] == "first":
            first_done[t[1]] = end
        heapq.heappush(free, end)
    return max(free)


def estimate_seconds(cfg: CollapseConfig, tokenizer, heldout: list[str], new_tokens: int,
                     device: str = "cpu") -> dict[str, Any]:
    """The GPT scale's duration here: a few timed training steps, one engine batch of max_batch rows and
    a held-out perplexity pass (this process, cfg.threads), then the tasks laid out on cfg.workers
    processes, each assumed to run as fast as this one (a free core each)."""
    steps = 4
    learner = GPTLearner(cfg, tokenizer, heldout, new_tokens, device=device)
    text = " ".join(heldout)[:20_000] or "The lab measures its own speed before it starts."
    learner.fit([text], seed=0, tokens=cfg.batch_size * cfg.seq_len)  # warm up
    t0 = time.perf_counter()
    model = learner.fit([text], seed=0, tokens=cfg.batch_size * cfg.seq_len * steps)
    train_tps = cfg.batch_size * cfg.seq_len * steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    learner.perplexity(model)
    ppl_s = time.perf_counter() - t0
    rows, short = cfg.max_batch, min(new_tokens, 16)
    writer = GPTLearner(cfg, tokenizer, heldout, short, device=device)
    prompts = [text[i:i + 64] for i in range(rows)]
    writer.sample(model, prompts[:2], Sampling("pure"), [0, 1])  # warm up
    t0 = time.perf_counter()
    writer.sample(model, prompts, Sampling("pure"), list(range(rows)))
    write_tps = rows * short / (time.perf_counter() - t0)
    rates = {"train": train_tps, "write": write_tps, "perplexity_s": ppl_s}
    seconds = {t: task_seconds(cfg, t, rates, new_tokens) for t in tasks(cfg)}
    busy = sum(seconds.values())
    wall = layout(cfg, seconds)
    return {"train_tokens_per_s": round(train_tps), "write_tokens_per_s": round(write_tps),
            "perplexity_s": round(ppl_s, 2), "workers": cfg.workers, "busy_s": round(busy),
            "tasks_s": {"/".join(t): round(s) for t, s in seconds.items()},
            "total_s": round(1.1 * wall)}
