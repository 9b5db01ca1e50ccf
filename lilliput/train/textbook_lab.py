"""The textbook lab (Phi-1's question at small scale): does a student learn more from a teacher's
textbook-style text than from human text, for the same tokens?

Byte-level students (ByteTokenizer GPTs) of one size are trained from scratch, each on `train.max_tokens`
tokens of a pool the size of the textbook training set whose share `f` is textbook text (whole
documents) and `1 - f` human text (random 1 KiB windows of the corpus), for each f in `mixes`, `seeds`
times (a seed sets the initialisation, the pool's human windows and document order, and the batches).
Every student is scored on

- held-out human text (the LAMBADA passages of `eval.perplexity.HELDOUT`) and held-out textbook
  documents (byte perplexity);
- zero-shot tasks (ARC-Easy, PIQA, SciQ by default): acc_norm item by item, so that two mixes are
  compared on the same questions (`summarize`: seed means, and the paired difference to the human-only
  students with a bootstrap interval over questions);
- the word diversity of what it writes from openings of held-out text.

Students run on `workers` processes of `threads` torch threads each (spawned; the texts are handed to
each worker once). A student is a pure function of (config, texts, share, seed).

    rows = train_students(cfg, texts)
    fields = summarize(rows, cfg)
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.diversity import distinct_n, unigram_entropy
from lilliput.eval.intervals import bootstrap_mean, paired_difference, seed_summary
from lilliput.eval.perplexity import HELDOUT, PerplexityConfig, heldout, perplexity
from lilliput.eval.tasks import TASKS, choice_correct, loglikelihoods
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.train.data import random_windows
from lilliput.train.loop import LanguageModeling, TrainConfig, Trainer, WindowBatches

OPENING = 32
"""Bytes of held-out text each diversity sample continues."""
PARAM_TOKENS_PER_S = 3e9
"""Student training speed on one thread: parameters x tokens per second (for the estimate)."""


@dataclass(frozen=True)
class TextbookLabConfig:
    mixes: tuple[float, ...] = (0.0, 0.5, 1.0)
    """Textbook shares of the students' data: human only, half and half, textbook only."""
    seeds: int = 3
    """Students per share."""
    dim: int = 128
    layers: int = 5
    heads: int = 4
    seq_len: int = 256
    batch: int = 8
    train: TrainConfig = field(default=TrainConfig(lr=2e-3, warmup_steps=20, max_tokens=1_200_000, progress=False,
                                                   log_every=10**9))
    """The students' optimizer and budget (`max_tokens` bytes each; the seed is the student's)."""
    tasks: tuple[str, ...] = ("arc_easy", "piqa", "sciq")
    """Zero-shot tasks (keys of eval.tasks.TASKS; multiple choice)."""
    task_limit: int | None = None
    """First N items of each task (None: all)."""
    eval_bytes: int = 60_000
    """Most bytes of held-out textbook text scored."""
    samples: int = 32
    """Generations per student for the diversity figures."""
    sample_bytes: int = 192
    """Bytes per generation (after a 32-byte opening; the two fit in seq_len)."""
    workers: int = 2
    threads: int = 1
    """Torch threads per worker."""

    def __post_init__(self):
        if not self.mixes or any(not 0.0 <= f <= 1.0 for f in self.mixes):
            raise ValueError(f"mixes must be shares in [0, 1], got {self.mixes}")
        if self.seeds < 1 or self.workers < 1 or self.threads < 1:
            raise ValueError(f"seeds, workers and threads must be >= 1, got {self.seeds}, {self.workers}, "
                             f"{self.threads}")
        if not self.train.max_tokens:
            raise ValueError("train.max_tokens must be set: every student trains on the same tokens")
        if OPENING + self.sample_bytes > self.seq_len:
            raise ValueError(f"sample_bytes {self.sample_bytes} + a {OPENING}-byte opening is longer than seq_len "
                             f"{self.seq_len}")
        unknown = [t for t in self.tasks if t not in TASKS or t == "lambada"]
        if unknown:
            raise ValueError(f"tasks must be multiple-choice keys of eval.tasks.TASKS, got {unknown}")

    def model_config(self) -> ModelConfig:
        return ModelConfig(name="textbook-student", vocab_size=256, dim=self.dim, n_layers=self.layers,
                           n_heads=self.heads, n_kv_heads=max(1, self.heads // 2), ffn_dim=3 * self.dim,
                           max_seq_len=self.seq_len)

    def estimate_seconds(self, parameters: int) -> float:
        """Wall seconds of every student on `workers` quiet cores (training, plus ~30 s of scoring each)."""
        one = parameters * self.train.max_tokens / (PARAM_TOKENS_PER_S * self.threads) + 30
        runs = len(self.mixes) * self.seeds
        return one * -(-runs // self.workers)


@dataclass(frozen=True)
class Texts:
    """What the students learn from and are scored on."""

    human: bytes
    """The human corpus as one UTF-8 byte string."""
    textbook_train: tuple[str, ...]
    """Textbook documents to train on."""
    textbook_test: str
    """Held-out textbook text (documents joined by blank lines)."""
    openings: tuple[str, ...]
    """Texts whose first OPENING bytes each diversity sample continues."""


def byte_stream(texts, sep: str = "\n\n") -> torch.Tensor:
    """Texts joined by `sep` as ByteTokenizer ids, uint8 (no Python list per byte): (N,)."""
    return torch.frombuffer(bytearray(sep.join(texts).encode("utf-8")), dtype=torch.uint8)


def mixed_pool(human: torch.Tensor, textbook: tuple[str, ...], fraction: float, size: int, seed: int) -> torch.Tensor:
    """`size` byte ids (long): `fraction` of them textbook text (whole documents in a seeded random order),
    the rest random 1 KiB windows of the human stream."""
    g = torch.Generator().manual_seed(seed)
    parts, n_syn = [], round(fraction * size)
    if n_syn:
        order = torch.randperm(len(textbook), generator=g).tolist()
        parts.append(byte_stream([textbook[i] for i in order])[:n_syn])
    n_hum = size - sum(p.numel() for p in parts)
    if n_hum > 0:
        windows = random_windows(human, -(-n_hum // 1024), 1024, seed=seed)  # (n, 1024)
        parts.insert(0, windows.reshape(-1)[:n_hum])
    return torch.cat(parts).long()


def word_diversity(texts: list[str]) -> dict:
    words = [t.split() for t in texts]
    return {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2), "distinct_3": distinct_n(words, 3),
            "word_entropy_bits": unigram_entropy([w for ws in words for w in ws]),
            "words": sum(len(w) for w in words)}


def sample_texts(model, tok, openings: list[list[int]], n_bytes: int, seed: int, batch: int) -> list[str]:
    """One continuation of `n_bytes` bytes per opening, temperature 1, seeded per opening."""
    engine = Engine(model, tok, EngineConfig(max_batch=batch, max_len=model.config.max_seq_len))
    seqs = [engine.add(o, GenerationConfig(max_new_tokens=n_bytes, temperature=1.0, seed=seed + i))
            for i, o in enumerate(openings)]
    engine.run()
    return [s.text for s in seqs]


def task_scores(model, tok, cfg: TextbookLabConfig) -> dict[str, list[int]]:
    """{task: acc_norm of each item (0/1)}, zero-shot."""
    out = {}
    for name in cfg.tasks:
        items = TASKS[name].load(cfg.task_limit)
        results = loglikelihoods(model, tok, [r for item in items for r in item.requests()], batch_size=16)
        out[name] = [int(norm) for _, norm in choice_correct(items, results)]
    return out


def train_student(cfg: TextbookLabConfig, texts: Texts, fraction: float, seed: int) -> dict:
    """Train one student on its pool and score it: a row of the lab."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    human = torch.frombuffer(bytearray(texts.human), dtype=torch.uint8)
    pool = mixed_pool(human, texts.textbook_train, fraction, byte_stream(texts.textbook_train).numel(), seed)
    torch.manual_seed(seed)
    model = GPT(cfg.model_config())
    summary = Trainer(LanguageModeling(model), WindowBatches(pool, cfg.batch, cfg.seq_len, seed=seed),
                      dataclasses.replace(cfg.train, seed=seed)).fit()
    train_s = time.perf_counter() - t0
    model.eval()
    tok = ByteTokenizer()
    h = heldout(model, tok, dataclasses.replace(HELDOUT, window=min(HELDOUT.window, cfg.seq_len)))
    tb = perplexity(model, tok, texts.textbook_test[: cfg.eval_bytes], PerplexityConfig(window=cfg.seq_len,
                                                                                          batch_size=8))
    items = task_scores(model, tok, cfg)
    openings = [tok.encode(t)[:OPENING] for t in texts.openings]
    samples = sample_texts(model, tok, openings, cfg.sample_bytes, seed, batch=min(16, len(openings)))
    return {"synthetic_fraction": fraction, "seed": seed, "ppl_human": h["perplexity"],
            "ppl_textbook": tb["perplexity"], "human_tokens_scored": h["tokens"],
            "textbook_tokens_scored": tb["tokens"],
            "tasks": {name: sum(v) / len(v) for name, v in items.items()}, "task_items": items,
            "train_loss": summary["final"].get("loss"), "train_steps": summary["steps"],
            "train_tokens": summary["tokens"], "train_seconds": round(train_s, 1),
            "seconds": round(time.perf_counter() - t0, 1), "diversity": word_diversity(samples),
            "sample": samples[0][:200]}


_SHARED: tuple[TextbookLabConfig, Texts] | None = None


def _share(cfg: TextbookLabConfig, texts: Texts) -> None:
    global _SHARED
    _SHARED = (cfg, texts)


def _student(fraction: float, seed: int) -> dict:
    assert _SHARED is not None, "a worker without its texts"
    return train_student(*_SHARED, fraction, seed)


def train_students(cfg: TextbookLabConfig, texts: Texts, log=print) -> list[dict]:
    """Every (share, seed) student, on cfg.workers processes: rows in (share, seed) order."""
    runs = [(f, s) for f in cfg.mixes for s in range(cfg.seeds)]
    if cfg.workers == 1:
        rows = []
        for f, s in runs:
            rows.append(train_student(cfg, texts, f, s))
            log(_row_line(rows[-1]))
        return rows
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_share,
                             initargs=(cfg, texts)) as pool:
        futures = [pool.submit(_student, f, s) for f, s in runs]
        rows = []
        for fut in futures:
            rows.append(fut.result())
            log(_row_line(rows[-1]))
    return rows


def _row_line(r: dict) -> str:
    tasks = ", ".join(f"{k} {v:.3f}" for k, v in r["tasks"].items())
    return (f"textbook share {r['synthetic_fraction']:.2f} seed {r['seed']}: ppl human {r['ppl_human']:.3f}, "
            f"textbook {r['ppl_textbook']:.3f}; {tasks} ({r['seconds']:.0f} s)")


def summarize(rows: list[dict], cfg: TextbookLabConfig) -> dict:
    """Per share: each figure over seeds; against the human-only students (share 0, when run): the ratio of
    perplexities seed by seed and, per task, the paired acc_norm difference with a bootstrap interval over
    questions (each question's correctness averaged over seeds)."""
    by_mix = {f: [r for r in rows if r["synthetic_fraction"] == f] for f in cfg.mixes}
    mixes = []
    for f, rs in by_mix.items():
        mixes.append({"synthetic_fraction": f, "seeds": len(rs),
                      "ppl_human": seed_summary([r["ppl_human"] for r in rs]),
                      "ppl_textbook": seed_summary([r["ppl_textbook"] for r in rs]),
                      "tasks": {t: {**seed_summary([r["tasks"][t] for r in rs]),
                                    "interval": bootstrap_mean(_item_means(rs, t))} for t in cfg.tasks},
                      "distinct_2": seed_summary([r["diversity"]["distinct_2"] for r in rs]),
                      "train_loss": seed_summary([r["train_loss"] for r in rs])})
    out: dict = {"mixes": mixes}
    if 0.0 in by_mix:
        base = {r["seed"]: r for r in by_mix[0.0]}
        out["vs_human"] = {}
        for f, rs in by_mix.items():
            if f == 0.0:
                continue
            paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            out["vs_human"][str(f)] = {
                "ppl_human_ratio": seed_summary([r["ppl_human"] / b["ppl_human"] for r, b in paired]),
                "ppl_textbook_ratio": seed_summary([r["ppl_textbook"] / b["ppl_textbook"] for r, b in paired]),
                "task_acc_norm_difference": {t: paired_difference(_item_means(rs, t), _item_means(by_mix[0.0], t))
                                             for t in cfg.tasks}}
    return out


def _item_means(rows: list[dict], task: str) -> list[float]:
    """Each question's acc_norm averaged over the rows (seeds)."""
    return [statistics.fmean(v) for v in zip(*(r["task_items"][task] for r in rows))]
