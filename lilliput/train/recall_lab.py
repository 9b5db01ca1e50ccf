"""The recall lab: accuracy on multi-query associative recall against decode-state size, for
attention, Mamba, xLSTM (mLSTM) and a hybrid (Zoology, Arora et al. 2023, figure 2 at CPU scale).

Every model has one shape: a *shift layer* (attention over the token and the one before it,
`shift_window`), then its architecture's mixer (attention, mamba or mlstm; the hybrid: mamba, then
attention), each layer with the feed-forward of its `*-arena` preset scaled to the width, `heads`
heads. The shift layer stands for the short convolution of Zoology's models and is given to all
alike: in the probe, 2-layer RoPE attention without it had not found the previous-token lookup after
3,200 steps (0.30 at 8 pairs, answering by elimination), and with it reached 0.93 after 375 steps.
Its state is two tokens' keys and values, so a fixed-state model stays fixed-state.

What the probe (width 64, the default mixture) found before this lab was sized: attention reaches
1.00 at every pair count after 800 steps at lr 3e-3 (the criterion: >= 0.9 at the widest width);
xLSTM 0.92, 0.79, 0.54, 0.25 at 8, 16, 32, 64 pairs; every model with a Mamba layer stayed at
chance after 800-1000 steps at lr 3e-4, 1e-3, 3e-3 and 1e-2, the hybrid too (with its attention
layer last, or first: 0.10 at 8 pairs), and so did Mamba with PyTorch's default init of its
projections. A Mamba line at chance here says that lilliput's Mamba layer did not learn the task in
this budget, not that its state is too small.

One model per (architecture, width, seed) learns every pair count at once (Zoology's mixture): pairs
n in `pairs` at seq_len 4 n (the pairs, then every key queried once), `batch_tokens` tokens per step
whatever n (64 sequences of 8 pairs, 8 of 64), the first `warm_steps` on the smallest n only, then
the pair counts in turn. Learning rates: each architecture is swept over `lrs` at the widest width
(seed 0) and the best on a validation stream (mean over pair counts) is kept for all its widths and
seeds (Zoology sweeps lr per model); the swept seed-0 run is reused. Accuracy: exact greedy value
at every query of `eval_sequences` fresh sequences per pair count (a stream no training run uses),
per seed, then the seed mean with its spread and a bootstrap interval over the sequences.
State: `eval.efficiency.state_bytes_at` at seq_len (fp32; attention's KV cache grows with it, the
recurrent states do not).

Runs go to `workers` processes of one torch thread each (the runs are independent); a run is a
pure function of its (architecture, width, seed, lr) and the config.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.eval.efficiency import parameter_count, state_bytes_at
from lilliput.eval.intervals import bootstrap_mean, seed_summary
from lilliput.train.loop import TrainConfig, Trainer
from lilliput.train.recall import QueriedValues, RecallConfig, RecallMixture, recall_hits

ARCHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attention": ("dense-arena", ("attention",)),
    "mamba": ("mamba-arena", ("mamba",)),
    "xlstm": ("xlstm-arena", ("mlstm",)),
    "hybrid": ("hybrid-arena", ("mamba", "attention")),
}
"""Architecture -> (the arena preset whose feed-forward ratio it keeps, its mixers after the shift layer,
repeated `depth` times). The hybrid is Mamba with an attention layer after it: one layer deeper."""
VALID_SEED, TEST_SEED = 20_000, 10_000
"""Streams of the validation (lr choice) and test sequences; training streams are the run seeds."""


@dataclass(frozen=True)
class RecallLabConfig:
    archs: tuple[str, ...] = ("attention", "mamba", "xlstm", "hybrid")
    """Architectures compared (keys of ARCHS)."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Model widths (multiples of 16)."""
    pairs: tuple[int, ...] = (8, 16, 32, 64)
    """Key-value pairs per sequence, each a panel; sequences are 4 x pairs tokens."""
    vocab_size: int = 1024
    """Token ids: keys in the lower half, values in the upper."""
    seeds: int = 3
    """Runs per architecture and width (each seed sets the initialisation and the training stream)."""
    steps: int = 1000
    """Optimizer steps per run."""
    warm_steps: int = 250
    """First steps trained on the smallest pair count only."""
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    """Peak learning rates swept per architecture at the widest width, seed 0 (AdamW, warmup then cosine)."""
    batch_tokens: int = 2048
    """Tokens per optimizer step (sequences of 4 n tokens: batch_tokens / 4n of them)."""
    depth: int = 1
    """Repeats of each architecture's mixers after the shift layer (ARCHS)."""
    heads: int = 2
    """Attention heads (and key-value heads) of the attention layers, and mLSTM heads."""
    shift_window: int | None = 2
    """Tokens the first layer (attention) sees: itself and shift_window - 1 before it; None: no shift layer."""
    eval_sequences: int = 256
    """Test sequences per pair count (and validation sequences for the lr choice)."""
    workers: int = 2
    """Processes running runs side by side (one torch thread each); 1 runs them here."""
    quick: bool = False
    """A smoke run (its figures show that the lab works, not which architecture recalls)."""

    def __post_init__(self):
        unknown = [a for a in self.archs if a not in ARCHS]
        if not self.archs or unknown:
            raise ValueError(f"archs must be some of {', '.join(ARCHS)}, got {self.archs}")
        if not self.widths or any(w < 16 or w % 16 for w in self.widths):
            raise ValueError(f"widths must be multiples of 16, got {self.widths}")
        if not self.pairs or not self.lrs:
            raise ValueError("give at least one pair count and one learning rate")
        for name in ("seeds", "steps", "depth", "heads", "eval_sequences", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warm_steps <= self.steps:
            raise ValueError(f"warm_steps must be in [0, steps={self.steps}], got {self.warm_steps}")
        if any(w % (2 * self.heads) for w in self.widths):
            raise ValueError(f"every width must split into {self.heads} heads of even width, got {self.widths}")
        if self.shift_window is not None and self.shift_window < 1:
            raise ValueError(f"shift_window must be >= 1 or None, got {self.shift_window}")
        if any(n < 1 for n in self.pairs) or self.batch_tokens < 4 * max(self.pairs):
            raise ValueError(f"batch_tokens ({self.batch_tokens}) must hold a sequence of 4 x {max(self.pairs)} "
                             f"pairs tokens (pairs must be >= 1, got {self.pairs})")
        self.tasks()  # RecallConfig checks the vocabulary against the pairs

    def tasks(self) -> tuple[RecallConfig, ...]:
        """The training task of each pair count, smallest first (seq_len 4 n, batch_tokens per batch)."""
        return tuple(RecallConfig(self.vocab_size, 4 * n, n, self.batch_tokens // (4 * n)) for n in sorted(self.pairs))


def quick_config(**changes) -> RecallLabConfig:
    """Smoke budgets: two architectures, one width, two pair counts, a few steps, in seconds."""
    q = dict(quick=True, archs=("attention", "mamba"), widths=(16,), pairs=(4, 8), vocab_size=64, seeds=2,
             steps=4, warm_steps=1, lrs=(3e-3, 1e-2), batch_tokens=128, eval_sequences=8, workers=1)
    return RecallLabConfig(**{**q, **changes})


# --- one run ------------------------------------------------------------------------------------

def lab_model(arch: str, width: int, cfg: RecallLabConfig, seed: int = 0) -> GPT:
    """A fresh (seeded) model of `arch` at `width`: the shift layer, then its mixers (`cfg.depth` times)."""
    name, pattern = ARCHS[arch]
    base = preset(name)
    mixers = pattern * cfg.depth
    shift = () if cfg.shift_window is None else ("attention",)
    longest = 4 * max(cfg.pairs)
    chunk = min(64, 4 * min(cfg.pairs))
    torch.manual_seed(seed)
    return GPT(base.replace(
        vocab_size=cfg.vocab_size, dim=width, ffn_dim=max(16, 8 * round(base.ffn_dim * width / base.dim / 8)),
        n_layers=len(shift) + len(mixers), layer_mixers=shift + mixers, n_heads=cfg.heads, n_kv_heads=cfg.heads,
        max_seq_len=longest, ssm_chunk=chunk, mlstm_chunk=chunk,
        sliding_window=cfg.shift_window, sliding_layers=(0,) if shift else (), name=f"recall-{arch}-w{width}"))


def train_config(cfg: RecallLabConfig, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(lr=lr, warmup_steps=max(1, cfg.steps // 10), max_steps=cfg.steps, seed=seed, progress=False)


def eval_tasks(cfg: RecallLabConfig) -> tuple[RecallConfig, ...]:
    """Each pair count's evaluation batches (64 sequences or fewer)."""
    return tuple(dataclasses.replace(c, batch_size=min(64, cfg.eval_sequences)) for c in cfg.tasks())


def run(arch: str, width: int, seed: int, lr: float, cfg: RecallLabConfig, threads: int | None = 1) -> dict:
    """Train one model and score it: {"arch", "width", "seed", "lr", "parameters", "seconds", "final_ce",
    "valid" (mean validation accuracy over pair counts), "accuracy" {pairs: mean}, "hits" {pairs: per-sequence
    accuracies}}."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = lab_model(arch, width, cfg, seed)
    data = RecallMixture(cfg.tasks(), seed=seed, warm_steps=cfg.warm_steps)
    t = time.process_time()
    fit = Trainer(QueriedValues(model), data, train_config(cfg, lr, seed)).fit()
    tasks = eval_tasks(cfg)
    valid = statistics.fmean(statistics.fmean(recall_hits(model, c, cfg.eval_sequences, VALID_SEED)) for c in tasks)
    hits = {str(c.n_pairs): recall_hits(model, c, cfg.eval_sequences, TEST_SEED) for c in tasks}
    return {"arch": arch, "width": width, "seed": seed, "lr": lr, "parameters": parameter_count(model),
            "train_seconds": fit["seconds"], "cpu_seconds": round(time.process_time() - t, 2),
            "final_ce": fit["final"]["ce"], "valid": valid,
            "accuracy": {n: statistics.fmean(h) for n, h in hits.items()}, "hits": hits}


def _run(args: tuple) -> dict:
    return run(*args)


def run_all(jobs: list[tuple], cfg: RecallLabConfig, log=None) -> list[dict]:
    """`run` of every (arch, width, seed, lr) in `jobs`, on `cfg.workers` processes (here when 1), in order."""
    args = [(*j, cfg) for j in jobs]
    if cfg.workers == 1 or len(jobs) == 1:
        out = []
        for a in args:
            out.append(_run(a))
            log and log(out[-1])
        return out
    import multiprocessing

    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = []
        for r in pool.map(_run, args):  # in submission order: the slowest first keeps both workers busy
            out.append(r)
            log and log(r)
        return out


# --- the lab ------------------------------------------------------------------------------------

def step_seconds(arch: str, width: int, cfg: RecallLabConfig) -> float:
    """CPU seconds of one optimizer step of `arch` at `width`, averaged over the pair counts (a step of
    each after a warm-up step; this process's CPU time, which other work on the machine inflates less
    than the wall clock)."""
    torch.set_num_threads(1)
    model = lab_model(arch, width, cfg)
    tasks = cfg.tasks()
    data = RecallMixture(tasks + tasks)  # index i and i + len(tasks): the same pair count
    trainer = Trainer(QueriedValues(model), data, dataclasses.replace(train_config(cfg, cfg.lrs[0], 0),
                                                                     max_steps=2 * len(tasks)))
    trainer.fit(until=1)
    total = 0.0
    for i in range(1, len(tasks) + 1):
        t = time.process_time()
        trainer.fit(until=i + 1)
        total += time.process_time() - t
    return total / len(tasks)


def estimate(cfg: RecallLabConfig) -> dict:
    """Minutes the lab should take on `cfg.workers` free cores: steps x CPU seconds per step of every run
    (timed here, one step per pair count), plus a quarter for evaluation and start-up, over the workers."""
    per_step = {f"{a} w{w}": step_seconds(a, w, cfg) for a in cfg.archs for w in cfg.widths}
    runs = plan(cfg, {a: cfg.lrs[0] for a in cfg.archs})  # the sweep's run at lrs[0] is one of them
    sweep = (len(cfg.lrs) - 1) * sum(per_step[f"{a} w{max(cfg.widths)}"] for a in cfg.archs)
    cpu = 1.25 * cfg.steps * (sweep + sum(per_step[f"{a} w{w}"] for a, w, _, _ in runs))
    return {"step_cpu_seconds": {k: round(v, 4) for k, v in per_step.items()},
            "cpu_minutes": round(cpu / 60, 1), "minutes": round(cpu / 60 / cfg.workers, 1)}


def plan(cfg: RecallLabConfig, best: dict[str, float]) -> list[tuple]:
    """Every (arch, width, seed, lr) run at each architecture's chosen lr, widest first (the slowest first)."""
    return [(a, w, s, best[a]) for w in sorted(cfg.widths, reverse=True) for s in range(cfg.seeds) for a in cfg.archs]


def recall_lab(cfg: RecallLabConfig, log=print) -> dict:
    """Sweep, train, score; the fields of recall.json (without the run record)."""
    t0 = time.perf_counter()
    est = estimate(cfg)
    log(f"estimated {est['minutes']:.1f} min on {cfg.workers} free cores ({est['cpu_minutes']:.1f} CPU min)")
    widest = max(cfg.widths)
    say = lambda r: log(f"{r['arch']:<9} w{r['width']:<4} seed {r['seed']} lr {r['lr']:g}: valid {r['valid']:.3f}, "  # noqa: E731
                        + ", ".join(f"{n}: {a:.3f}" for n, a in r["accuracy"].items()) + f" ({r['cpu_seconds']:.0f} s)")

    # 1. the lr sweep: every architecture at the widest width, seed 0; the best on validation is kept
    sweep = run_all([(a, widest, 0, lr) for lr in cfg.lrs for a in cfg.archs], cfg, say) if len(cfg.lrs) > 1 else []
    best = {a: max((r for r in sweep if r["arch"] == a), key=lambda r: r["valid"])["lr"] if sweep else cfg.lrs[0]
            for a in cfg.archs}
    # 2. every width and seed at its architecture's lr (the swept seed-0 runs reused)
    done = {(r["arch"], r["width"], r["seed"], r["lr"]): r for r in sweep}
    todo = [j for j in plan(cfg, best) if j not in done]
    runs = {**done, **{tuple(r[k] for k in ("arch", "width", "seed", "lr")): r for r in run_all(todo, cfg, say)}}
    chosen = [runs[j] for j in plan(cfg, best)]

    results = {}
    for a in cfg.archs:
        results[a] = {"lr": best[a], "by_width": {}}
        for w in cfg.widths:
            rs = sorted((r for r in chosen if r["arch"] == a and r["width"] == w), key=lambda r: r["seed"])
            model = lab_model(a, w, cfg)
            results[a]["by_width"][str(w)] = {
                "parameters": rs[0]["parameters"],
                "state_bytes_at_seq_len": {str(n): state_bytes_at(model, 4 * n) for n in sorted(cfg.pairs)},
                "accuracy": {n: {**seed_summary([r["accuracy"][n] for r in rs]), **interval([r["hits"][n] for r in rs])}
                             for n in rs[0]["accuracy"]},
                "final_ce": seed_summary([r["final_ce"] for r in rs]),
            }
    for r in [*sweep, *chosen]:
        r.pop("hits", None)
    attention = results.get("attention", {}).get("by_width", {}).get(str(widest))
    most = str(max(cfg.pairs))
    return {
        "quick": cfg.quick,
        "config": dataclasses.asdict(cfg),
        "what_was_run": what_was_run(cfg),
        "what_it_shows": WHAT_IT_SHOWS,
        "tasks": [dataclasses.asdict(c) for c in cfg.tasks()],
        "mixers": {a: [lab_model(a, min(cfg.widths), cfg).config.mixer_at(i)
                       for i in range(lab_model(a, min(cfg.widths), cfg).config.n_layers)] for a in cfg.archs},
        "widest": widest,
        "attention_worst_accuracy": min(x["mean"] for x in attention["accuracy"].values()) if attention else None,
        "accuracy_at_most_pairs": {a: results[a]["by_width"][str(widest)]["accuracy"][most]["mean"] for a in cfg.archs},
        "estimate": est,
        "seconds": round(time.perf_counter() - t0, 1),
        "archs": results,
        "lr_sweep": [{k: r[k] for k in ("arch", "width", "seed", "lr", "valid", "accuracy", "cpu_seconds")} for r in sweep],
        "runs": chosen,
    }


def interval(hits: list[list[float]]) -> dict:
    """95% bootstrap interval of the seed-mean accuracy over the test sequences (the same sequences for
    every seed, so each sequence's accuracy is averaged over seeds first)."""
    per_sequence = [statistics.fmean(h) for h in zip(*hits)]
    b = bootstrap_mean(per_sequence, resamples=2000)
    return {"ci_low": b["ci_low"], "ci_high": b["ci_high"], "sequences": b["n"]}


WHAT_IT_SHOWS = (
    "Whether each architecture, trained the same way at the same width, can look up the value of a key "
    "it saw earlier in the sequence, as the number of pairs grows against its decode-state size. It does not "
    "show what longer training, other widths, vocabularies or layer counts would give (a model that "
    "would learn the task in 10x the steps reads here as one that cannot), nor quality on text (the "
    "arena measures that): in the probe every model with a Mamba layer, the hybrid included, stayed at "
    "chance at every swept lr, so a Mamba or hybrid line at chance reads as 'did not learn in this budget', not "
    "as 'its state is too small'. The shift layer (attention over 2 tokens) is given to every model alike; "
    "xLSTM's own mLSTM has no short convolution here, and the last query of a sequence (every key is "
    "queried once, at seq_len 4 n) could be answered by elimination.")


def what_was_run(cfg: RecallLabConfig) -> str:
    return (f"MQAR (train/recall.py), vocabulary {cfg.vocab_size}, pairs {list(cfg.pairs)} at 4 x pairs tokens, "
            f"every key queried once; models: a shift layer (attention over {cfg.shift_window} tokens) then "
            f"its mixers ({'; '.join(f'{a}: ' + ' + '.join(ARCHS[a][1] * cfg.depth) for a in cfg.archs)}), {cfg.heads} heads, "
            f"widths {list(cfg.widths)}; one model per architecture, width and seed trained on every pair "
            f"count in turn ({cfg.warm_steps} first steps on the smallest), {cfg.steps} AdamW steps of "
            f"{cfg.batch_tokens} tokens, loss at the queried values only; lr swept over {list(cfg.lrs)} per "
            f"architecture at width {max(cfg.widths)}, seed 0, best on {cfg.eval_sequences} validation "
            f"sequences per pair count kept; {cfg.seeds} seeds (init and data); accuracy = exact greedy value at "
            f"every query of {cfg.eval_sequences} test sequences per pair count")
