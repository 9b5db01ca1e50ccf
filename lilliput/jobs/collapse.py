"""`lilliput collapse`: the model-collapse lab with real small GPTs, its toy scales, and the watermark loop.

Three scales, one loop (collapse_toy.run_lab; every document through a provenance ledger,
each generation's training set chosen by `Ledger.select` for the policy):

1. a Gaussian refitted to its own samples (seconds; variance under replace vs accumulate);
2. a count-based word bigram model over corpus pieces (seconds);
3. byte-level GPTs of ~1M parameters trained from scratch on pieces of the default corpus with
   the Trainer, sampled through the Engine (one row per document, a seed per document), pure
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

The watermark closes the loop: generation 0 of seed 0 writes documents through the
Kirchenbauer watermark (data/watermark.py, byte vocabulary of 256), they are mixed with human
pieces into a "scraped" set, the detector scores every piece, and the verdict routes it into a
ledger as synthetic (with the key id) or human; the report counts true and false positives.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.options import flag, nested
from lilliput.core.record import run_record, write_json
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.data.ledger import Entry, Generator, Ledger, SelectionConfig, mix_sizes, model_fingerprint
from lilliput.data.watermark import Detector, Watermark, WatermarkConfig, key_id
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import PerplexityConfig, perplexity
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.jobs.collapse_toy import (POLICIES, BigramLearner, Sampling, chunks_of, curves, gaussian_study, growth, run_lab,
                                        samplings, split_chunks)
from lilliput.train.data import default_documents
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


# --- the watermark loop -------------------------------------------------------------------------

def scrape_and_route(learner: GPTLearner, model: GPT, human: list[str], prompts: list[str], ledger_path: Path,
                     delta: float, key: str = "lilliput-collapse-lab", seed: int = 0) -> dict[str, Any]:
    """Watermarked documents mixed with human ones, detected, and routed into a ledger by the verdict."""
    wcfg = WatermarkConfig(delta=delta)
    synthetic = learner.sample(model, prompts, Sampling("pure"), [10_000_000 + i for i in range(len(prompts))],
                               processors=(Watermark(key, wcfg),))
    scraped = [(t, True) for t in synthetic] + [(t, False) for t in human]
    random.Random(seed).shuffle(scraped)
    det = Detector(key, wcfg)
    found = [det.detect_text(t, learner.tok) for t, _ in scraped]
    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger_path) + suffix).unlink(missing_ok=True)
    flagged = Generator(model="unknown (found by its watermark)", watermark_key_id=key_id(key))
    entries = [Entry(text=t, id=f"scraped/{i:05d}", source="scraped", origin="synthetic" if d.watermarked else "human",
                     generator=flagged if d.watermarked else None, generation=1 if d.watermarked else 0)
               for i, ((t, _), d) in enumerate(zip(scraped, found))]
    with Ledger.open(ledger_path) as ledger:
        ids = ledger.add_many(entries)
        ledger.decide([(i, "watermark", True, f"{d.verdict}, z {d.z:.2f}") for i, d in zip(ids, found)],
                      run="collapse lab: scraped set")
        kept = set(ledger.select(SelectionConfig("human")).ids)
        stats = ledger.stats()
    truth = {i: is_synth for i, (_, is_synth) in zip(ids, scraped)}
    tp = sum(d.watermarked and s for d, (_, s) in zip(found, scraped))
    fp = sum(d.watermarked and not s for d, (_, s) in zip(found, scraped))
    n_s, n_h = len(synthetic), len(human)
    z_s = [d.z for d, (_, s) in zip(found, scraped) if s]
    z_h = [d.z for d, (_, s) in zip(found, scraped) if not s]
    return {"key_id": key_id(key), "gamma": wcfg.gamma, "delta": delta, "z_threshold": wcfg.z_threshold,
            "synthetic": n_s, "human": n_h, "true_positives": tp, "false_positives": fp,
            "false_negatives": n_s - tp, "true_negatives": n_h - fp,
            "tpr": tp / n_s if n_s else None, "fpr": fp / n_h if n_h else None,
            "insufficient_evidence": sum(d.verdict == "insufficient evidence" for d in found),
            "mean_z_synthetic": sum(z_s) / len(z_s) if z_s else None, "mean_z_human": sum(z_h) / len(z_h) if z_h else None,
            "mean_tokens_scored": sum(d.tokens_scored for d in found) / len(found),
            "human_selection": len(kept), "human_selection_synthetic": sum(truth[i] for i in kept),
            "ledger": str(ledger_path), "ledger_stats": stats["by_generation"]}


# --- the whole lab ------------------------------------------------------------------------------

def run_collapse(cfg: CollapseConfig, out: Path | str, device: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three scales and the watermark loop; ledgers go under out/ledgers. Returns the result fields."""
    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    estimate = estimate_seconds(cfg, device)
    w = work(cfg)
    log(f"collapse lab: {w['models']} GPTs, {w['train_tokens']:,} tokens trained (budget {cfg.budget}: generation 0 "
        f"{cfg.train.max_tokens:,}), {w['documents_written']:,} documents written; estimated {estimate['total_s'] / 60:.1f} minutes here (training {estimate['train_tokens_per_s']:,} "
        f"tok/s, writing {estimate['write_tokens_per_s']:,} tok/s), plus about a minute for the toy scales")
    sampling = samplings(cfg.samplings, cfg.top_p)
    docs = default_documents(prefer_full=cfg.full_corpus)
    lab = dict(generations=cfg.generations, policies=cfg.policies, sampling=sampling, seeds=cfg.seeds,
               human_fraction=cfg.human_fraction)

    t0 = time.perf_counter()
    gaussian = gaussian_study(cfg.gaussian_samples, cfg.gaussian_generations, seeds=20, policies=cfg.policies,
                              human_fraction=cfg.human_fraction)
    train_w, held_w = split_chunks(chunks_of(docs, cfg.ngram_words, "words"), cfg.ngram_documents,
                                   cfg.heldout_documents)
    bigram = BigramLearner([t for _, _, t in train_w], [t for _, _, t in held_w], doc_words=cfg.ngram_words)
    ngram_runs = run_lab(bigram, train_w, [t for _, _, t in held_w], out / "ledgers" / "ngram", **lab)
    ngram = curves(ngram_runs)
    log(f"toy scales: {time.perf_counter() - t0:.1f} s; bigram perplexity growth "
        + ", ".join(f"{s}/{p} {growth(ngram[s][p]):.3f}" for s in ngram for p in ngram[s]))

    pieces = chunks_of(docs, cfg.doc_bytes)
    extra = cfg.watermark_documents
    train, held = split_chunks(pieces, cfg.documents, cfg.heldout_documents + extra)
    held, scrape_human = held[:cfg.heldout_documents], held[cfg.heldout_documents:]
    learner = GPTLearner(cfg, [t for _, _, t in held], device)
    first: dict[int, GPT] = {}
    t0 = time.perf_counter()
    runs = run_lab(learner, train, [t for _, _, t in held], out / "ledgers" / "gpt", log=log, first_models=first, **lab)
    gpt_s = time.perf_counter() - t0
    gpt = curves(runs)
    trained = {s: {p: [cfg.generation_tokens(m["train_documents"]) for m in chains[0]] for p, chains in by.items()}
               for s, by in runs.items()}  # the token budget of each generation (the same for every seed)

    watermark = None
    if extra:
        prompts = [t for _, _, t in random.Random(1).sample(train, extra)]
        watermark = scrape_and_route(learner, first[0], [t for _, _, t in scrape_human], prompts,
                                     out / "ledgers" / "scraped.sqlite", cfg.watermark_delta)
        log(f"watermark: caught {watermark['true_positives']}/{watermark['synthetic']} synthetic, "
            f"{watermark['false_positives']}/{watermark['human']} human flagged")

    head = sampling[0].name
    ppl_growth = {s: {p: growth(gpt[s][p]) for p in gpt[s]} for s in gpt}
    tail_change = {s: {p: growth(gpt[s][p], "tail_coverage") for p in gpt[s]} for s in gpt}
    result = {
        **{f"{p}_ppl_growth": ppl_growth[head][p] for p in cfg.policies},
        "headline_sampling": head,
        "ppl_growth": ppl_growth,
        "tail_coverage_ratio": tail_change,
        "gpt": {"parameters": parameter_count(GPT(cfg.model_config())), "model": cfg.model_config().to_dict(),
                "corpus_documents": len(docs), "corpus_pieces": len(pieces), "seconds": round(gpt_s, 1),
                "budget": cfg.budget, "train_tokens": trained, "curves": gpt},
        "ngram": {"ppl_growth": {s: {p: growth(ngram[s][p]) for p in ngram[s]} for s in ngram},
                  "tail_coverage_ratio": {s: {p: growth(ngram[s][p], "tail_coverage") for p in ngram[s]}
                                          for s in ngram},
                  "vocabulary": len(bigram.vocab), "curves": ngram},
        "gaussian": gaussian,
        "watermark": watermark,
        "config": dataclasses.asdict(cfg),
        "estimate": estimate,
        "work": w,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return result


# --- the figure ---------------------------------------------------------------------------------

def plot_collapse(result: dict[str, Any], path: Path | str) -> Path:
    """Perplexity and tail coverage vs generation, one line and min-max band per policy; a row per sampling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpt, ngram = result["gpt"]["curves"], result["ngram"]["curves"]
    rows = list(gpt)
    panels = [("perplexity", gpt, "GPT: held-out perplexity"), ("tail_coverage", gpt, "GPT: tail coverage"),
              ("perplexity", ngram, "bigram: held-out perplexity"), ("tail_coverage", ngram, "bigram: tail coverage")]
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.4 * len(rows)), squeeze=False)
    colors = {"replace": "tab:red", "accumulate": "tab:blue", "fraction": "tab:green"}
    for r, s in enumerate(rows):
        for c, (metric, data, title) in enumerate(panels):
            ax = axes[r][c]
            for p, curve in data[s].items():
                x, m = curve["generation"], curve[metric]
                ax.plot(x, m["mean"], marker="o", color=colors.get(p), label=p)
                ax.fill_between(x, m["min"], m["max"], color=colors.get(p), alpha=0.15)
            ax.set_title(f"{title} ({s})", fontsize=9)
            ax.set_xlabel("generation")
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Model collapse: replace vs accumulate (mean over seeds, band = min-max)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollapseJob:
    out: str = "runs/collapse"
    """Folder for collapse.json, collapse.png and the ledgers."""
    quick: bool = field(default=False, metadata=flag(action="store_true"))
    """Tiny models on the shipped sample, in seconds (the lab's sizes are QUICK's, flags change them further)."""
    device: str = "cpu"
    """cpu or cuda."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print the headline figures as one JSON object."""
    lab: CollapseConfig = field(default=CollapseConfig(), metadata=nested())
    """The lab's sizes."""


def quick_job() -> CollapseJob:
    """What `--quick` starts from."""
    return CollapseJob(quick=True, lab=QUICK)


def run_collapse_lab(job: CollapseJob) -> None:
    """`lilliput collapse`: run the lab, write collapse.json and collapse.png, print the headline figures."""
    out = Path(job.out)
    result = run_collapse(job.lab, out, device=job.device)
    path = write_json(out / "collapse.json", run_record("lilliput collapse", **result))
    png = plot_collapse(result, out / "collapse.png")
    growth_of = {k: v for k, v in result.items() if k.endswith("_ppl_growth")}
    if job.json:
        print(json.dumps(growth_of))
    else:
        for k, v in growth_of.items():
            print(f"{k}: {v:.3f}")
        print(f"-> {path}, {png}, ledgers under {out / 'ledgers'}")
