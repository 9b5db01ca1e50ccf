"""`lilliput arena`: dense attention, MoE, Mamba, xLSTM and a hybrid, compared at equal budget.

Every architecture is a byte-level preset of matched size (core/config.py `*-arena`: total
parameters within 5%; `moe-arena-active` matches the dense model's *active* parameters instead) and
is trained the same way: the same token stream (the default human corpus), the same batches for a
given seed, the same optimizer and schedule, for the same number of tokens, `seeds` times. Then:

1. quality: held-out perplexity per byte (and bits per byte) on LAMBADA passages, with windows of
   the training length, as mean, std, min and max over seeds; training tokens/s likewise;
2. decode cost against context: ms per decode step of a batch of rows whose state holds 256 ..
   8192 tokens (`eval.efficiency.decode_ms_by_context`: every architecture on the same torch path,
   the engine's runner path for non-Llama mixers; the fused C step is left out because it only
   covers all-attention models), and the decode state's bytes per sequence at each context;
3. associative recall: each architecture, narrowed to a few widths, trained briefly on multi-query
   associative recall (train/recall.py); accuracy on the queried values against width.

A job loads, calls the library, saves and prints: the measurements are the library's.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.options import nested
from lilliput.core.record import run_record, write_json
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.efficiency import (active_parameter_count, decode_ms_by_context, decode_state_bytes,
                                      parameter_count)
from lilliput.eval.intervals import seed_summary
from lilliput.eval.perplexity import HELDOUT, heldout
from lilliput.train.data import default_documents, token_stream
from lilliput.train.loop import LanguageModeling, TrainConfig, Trainer, WindowBatches
from lilliput.train.recall import RecallBatches, RecallConfig, recall_accuracy

ARCHS = {"dense": "dense-arena", "moe": "moe-arena", "moe-active": "moe-arena-active", "mamba": "mamba-arena",
         "xlstm": "xlstm-arena", "hybrid": "hybrid-arena"}
"""Architecture label -> its preset."""
RECALL_ARCHS = ("dense", "moe", "mamba", "xlstm", "hybrid")
"""Architectures trained on associative recall (moe-active has the same mixer as moe and dense)."""


@dataclass(frozen=True)
class ArenaJob:
    out: str = "arena"
    """Folder for arena.json and the arena_*.png plots."""
    quick: bool = False
    """A smoke run of every stage in seconds (tiny budgets; its figures show that it works, not who wins)."""
    seeds: int = 3
    """Training runs per architecture (each seed sets the initialisation and the batch order)."""
    sample_corpus: bool = False
    """Train on the corpus sample shipped in the package even where the full corpus is fetched."""
    train: TrainConfig = field(default=TrainConfig(lr=2e-3, max_tokens=450_000), metadata=nested(
        only=("lr", "warmup_steps", "max_tokens"), names={"max_tokens": "tokens"}))
    """How every run trains: AdamW, warmup then cosine, the same lr and token budget (--tokens) for every
    architecture (each run sets its own seed; no progress bar)."""
    batch_size: int = 16
    """Windows per optimizer step."""
    seq_len: int = 256
    """Tokens per training window (and per held-out perplexity window)."""
    eval_tokens: int | None = None
    """Held-out tokens (bytes) scored; None scores the default held-out passages."""
    contexts: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    """Context lengths at which decode is timed."""
    decode_batch: int = 4
    """Rows decoded together when timing decode."""
    decode_tokens: int = 8
    """Decode steps per timed run."""
    decode_repeats: int = 5
    """Timed runs per architecture and context (after one warm-up round; all interleaved)."""
    recall_widths: tuple[int, ...] = (16, 32, 64)
    """Model widths of the associative-recall runs."""
    recall_layers: int = 2
    """Layers of the associative-recall models (fewer than the hybrid's pattern of 4 keeps its last ones:
    mamba, attention for 2)."""
    recall_vocab: int = 64
    """Vocabulary of the recall task (keys in the lower half, values in the upper)."""
    recall_seq_len: int = 64
    """Tokens per recall sequence."""
    recall_pairs: int = 8
    """Key-value pairs per recall sequence."""
    recall_batch: int = 32
    """Recall sequences per optimizer step."""
    recall_steps: int = 600
    """Optimizer steps per recall run."""
    recall_lr: float = 3e-3
    """Peak learning rate of the recall runs."""
    threads: int | None = None
    """torch threads; None keeps torch's default (one per core)."""

    def __post_init__(self):
        for name in ("seeds", "batch_size", "seq_len", "decode_batch", "decode_tokens", "decode_repeats",
                     "recall_layers", "recall_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError(f"contexts must be positive token counts, got {self.contexts}")
        if not self.recall_widths or any(w % 16 for w in self.recall_widths):
            raise ValueError(f"recall_widths must be multiples of 16 (4 heads of even width), got {self.recall_widths}")
        RecallConfig(self.recall_vocab, self.recall_seq_len, self.recall_pairs, self.recall_batch)


def quick_job(**changes) -> ArenaJob:
    """The smoke-test budgets of `--quick` (changes on top)."""
    train = dataclasses.replace(ArenaJob().train, max_tokens=2 * 4 * 64, warmup_steps=1)
    q = dict(quick=True, sample_corpus=True, seeds=1, train=train, batch_size=4, seq_len=64, eval_tokens=1024,
             contexts=(256, 1024), decode_batch=2, decode_tokens=4, decode_repeats=2, recall_widths=(16, 32),
             recall_seq_len=32, recall_pairs=4, recall_batch=8, recall_steps=2)
    return ArenaJob(**{**q, **changes})


# --- the stages ---------------------------------------------------------------------------------

def arena_model(arch: str, seed: int, max_seq_len: int | None = None) -> GPT:
    """A freshly initialised arena model (seeded)."""
    cfg = preset(ARCHS[arch])
    torch.manual_seed(seed)
    return GPT(cfg if max_seq_len is None else cfg.replace(max_seq_len=max_seq_len))


def recall_model(arch: str, width: int, job: ArenaJob, seed: int = 0) -> GPT:
    """The arena preset of `arch` narrowed to `width` (feed-forward scaled alike) for the recall task."""
    cfg = preset(ARCHS[arch])
    ffn = max(16, 8 * round(cfg.ffn_dim * width / cfg.dim / 8))
    # fewer layers than the hybrid's pattern: keep its last ones, so its attention layer stays
    pattern = cfg.layer_mixers[-job.recall_layers:] if cfg.layer_mixers else ()
    torch.manual_seed(seed)
    return GPT(cfg.replace(vocab_size=job.recall_vocab, dim=width, ffn_dim=ffn, n_layers=job.recall_layers,
                           layer_mixers=pattern, max_seq_len=job.recall_seq_len,
                           ssm_chunk=min(cfg.ssm_chunk, job.recall_seq_len),
                           mlstm_chunk=min(cfg.mlstm_chunk, job.recall_seq_len), name=f"{cfg.name}-w{width}"))


def train_config(job: ArenaJob, seed: int) -> TrainConfig:
    return dataclasses.replace(job.train, seed=seed, progress=False)


def recall_train_config(job: ArenaJob, seed: int) -> TrainConfig:
    return TrainConfig(lr=job.recall_lr, warmup_steps=max(1, job.recall_steps // 10), max_steps=job.recall_steps,
                       seed=seed, progress=False)


def step_seconds(model: GPT, data, cfg: TrainConfig) -> float:
    """Seconds of one optimizer step of `model` (the second of two: the first warms up)."""
    trainer = Trainer(LanguageModeling(model), data, dataclasses.replace(cfg, max_steps=2, max_tokens=None))
    trainer.fit(until=1)
    t = time.perf_counter()
    trainer.fit(until=2)
    return time.perf_counter() - t


def estimate(job: ArenaJob, stream: torch.Tensor) -> dict:
    """Seconds each stage should take on this machine, from one timed optimizer step of every model
    (held-out scoring and prefill as a third of a training step per token, 6 ms per decode step)."""
    data = WindowBatches(stream, job.batch_size, job.seq_len)
    steps = math.ceil(job.train.max_tokens / (job.batch_size * job.seq_len))
    step = {arch: step_seconds(arena_model(arch, 0), data, train_config(job, 0)) for arch in ARCHS}
    per_token = {arch: s / (job.batch_size * job.seq_len) for arch, s in step.items()}
    eval_tokens = job.eval_tokens or 100 * 400  # ~400 bytes per LAMBADA passage
    widest = max(job.recall_widths)  # an upper bound: every width timed as the widest
    recall = len(job.recall_widths) * job.recall_steps * sum(
        step_seconds(recall_model(a, widest, job), RecallBatches(recall_config(job)), recall_train_config(job, 0))
        for a in RECALL_ARCHS)
    calls = (1 + job.decode_repeats) * job.decode_tokens
    decode = sum(per_token[a] / 3 * sum(job.contexts) + calls * len(job.contexts) * 0.006 for a in ARCHS)
    out = {"train": job.seeds * steps * sum(step.values()), "recall": recall, "decode": decode,
           "heldout": job.seeds * eval_tokens / 3 * sum(per_token.values())}
    return {**{k: round(v, 1) for k, v in out.items()}, "total": round(sum(out.values()), 1),
            "step_seconds": {a: round(s, 4) for a, s in step.items()}}


def recall_config(job: ArenaJob) -> RecallConfig:
    return RecallConfig(job.recall_vocab, job.recall_seq_len, job.recall_pairs, job.recall_batch)


def train_arch(arch: str, seed: int, job: ArenaJob, stream: torch.Tensor, tok) -> tuple[GPT, dict]:
    """Train one arena model on `stream` and score it on the held-out text."""
    model = arena_model(arch, seed)
    data = WindowBatches(stream, job.batch_size, job.seq_len, seed=seed)  # every arch sees the same batches
    fit = Trainer(LanguageModeling(model), data, train_config(job, seed)).fit()
    h = heldout(model, tok, dataclasses.replace(HELDOUT, window=job.seq_len), tokens=job.eval_tokens)
    return model, {"seed": seed, "tokens": fit["tokens"], "steps": fit["steps"], "seconds": fit["seconds"],
                   "tokens_per_s": fit["tokens_per_second"], "final_train_ce": fit["final"]["ce"],
                   "nll": h["nll"], "perplexity": h["perplexity"], "bits_per_byte": h["nll"] / math.log(2),
                   "heldout_tokens": h["tokens"]}


def recall_run(arch: str, width: int, job: ArenaJob) -> dict:
    model = recall_model(arch, width, job)
    cfg = recall_config(job)
    fit = Trainer(LanguageModeling(model), RecallBatches(cfg, seed=0), recall_train_config(job, 0)).fit()
    state = decode_state_bytes(model)
    return {"width": width, "parameters": parameter_count(model), "accuracy": recall_accuracy(model, cfg),
            "final_train_ce": fit["final"]["ce"], "seconds": fit["seconds"],
            "state_bytes_at_seq_len": state["per_sequence"] + state["per_token"] * job.recall_seq_len}


def growth(ms: dict[int, dict]) -> float:
    """Median ms per decode step at the longest context / at the shortest."""
    return ms[max(ms)]["median"] / ms[min(ms)]["median"]


def log(message: str) -> None:
    print(f"[arena] {message}", file=sys.stderr, flush=True)


def arena(job: ArenaJob) -> dict:
    """Run every stage; the fields of arena.json (without the run record)."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    t_start = time.perf_counter()
    tok = ByteTokenizer()
    docs = default_documents(prefer_full=not job.sample_corpus)
    stream = token_stream(tok, docs)
    corpus = {"documents": len(docs), "bytes": int(stream.numel()), "sources": sorted({d.source for d in docs})}
    log(f"corpus: {len(docs)} documents, {stream.numel():,} bytes; timing one step of every model ...")
    est = estimate(job, stream)
    log(f"estimated duration on this machine: {est['total'] / 60:.1f} min (train {est['train'] / 60:.1f}, "
        f"recall {est['recall'] / 60:.1f}, decode {est['decode'] / 60:.1f}, held-out {est['heldout'] / 60:.1f})")
    seconds: dict[str, float] = {}

    # 1. quality and training speed
    t = time.perf_counter()
    runs: dict[str, list[dict]] = {arch: [] for arch in ARCHS}
    trained: dict[str, GPT] = {}
    for seed in range(job.seeds):
        for arch in ARCHS:  # seed-major: a drifting machine slows every architecture alike
            model, r = train_arch(arch, seed, job, stream, tok)
            runs[arch].append(r)
            if seed == 0:
                trained[arch] = model
            log(f"{arch:<10} seed {seed}: held-out ppl/byte {r['perplexity']:.3f} ({r['bits_per_byte']:.3f} bpb), "
                f"{r['tokens_per_s']:,.0f} tok/s")
    seconds["train"] = time.perf_counter() - t

    # 2. decode cost against context (the seed-0 models, given room for the longest context)
    t = time.perf_counter()
    need = max(job.contexts) + job.decode_tokens
    decoders = {}
    for arch, model in trained.items():
        decoders[arch] = model
        if need > model.config.max_seq_len:  # contexts past the preset's: the same weights, longer RoPE tables
            decoders[arch] = arena_model(arch, 0, max_seq_len=need)
            decoders[arch].load_state_dict(model.state_dict())
    decode = decode_ms_by_context(decoders, job.contexts, job.decode_batch, job.decode_tokens, job.decode_repeats)
    seconds["decode"] = time.perf_counter() - t
    for arch in ARCHS:
        log(f"{arch:<10} decode ms/step: " + ", ".join(f"{c}: {decode[arch][c]['median']:.2f}" for c in job.contexts))

    # 3. associative recall against width
    t = time.perf_counter()
    recall: dict[str, list[dict]] = {}
    for arch in RECALL_ARCHS:
        recall[arch] = []
        for width in job.recall_widths:
            r = recall_run(arch, width, job)
            recall[arch].append(r)
            log(f"recall {arch:<8} width {width:>4}: accuracy {r['accuracy']:.3f}")
    seconds["recall"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start

    archs = {}
    for arch, name in ARCHS.items():
        model = trained[arch]
        state = decode_state_bytes(model)
        rs = runs[arch]
        archs[arch] = {
            "preset": name, "config": model.config.to_dict(),
            "parameters": parameter_count(model), "active_parameters": active_parameter_count(model),
            "heldout_perplexity": seed_summary([r["perplexity"] for r in rs]),
            "heldout_bits_per_byte": seed_summary([r["bits_per_byte"] for r in rs]),
            "train_tokens_per_s": seed_summary([r["tokens_per_s"] for r in rs]),
            "final_train_ce": seed_summary([r["final_train_ce"] for r in rs]),
            "runs": rs,
            "decode_state_bytes": {**state, "by_context": {str(c): state["per_sequence"] + state["per_token"] * c
                                                           for c in job.contexts}},
            "decode_ms": {str(c): decode[arch][c] for c in job.contexts},
            "decode_growth": growth(decode[arch]),
        }
    return {
        "quick": job.quick,
        "job": dataclasses.asdict(job),
        "what_was_run": what_was_run(job),
        "archs_trained": len(archs),
        "ssm_decode_growth": archs["mamba"]["decode_growth"],
        "attention_decode_growth": archs["dense"]["decode_growth"],
        "decode": {"unit": f"ms per decode step: one new token for each of {job.decode_batch} rows",
                   "path": "model(idx, DecodeState, rows) in torch for every architecture (no fused C step)",
                   "batch": job.decode_batch, "new_tokens": job.decode_tokens, "repeats": job.decode_repeats,
                   "contexts": list(job.contexts), "prompt": "random byte ids, prefilled in chunks of 512"},
        "corpus": corpus,
        "estimate_seconds": est,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "archs": archs,
        "recall": {"config": dataclasses.asdict(recall_config(job)), "steps": job.recall_steps, "lr": job.recall_lr,
                   "layers": job.recall_layers, "widths": list(job.recall_widths),
                   "mixers": {a: [recall_model(a, min(job.recall_widths), job).config.mixer_at(i)
                                  for i in range(job.recall_layers)] for a in RECALL_ARCHS},
                   "accuracy": {a: {str(r["width"]): r["accuracy"] for r in rs} for a, rs in recall.items()},
                   "runs": recall},
    }


def what_was_run(job: ArenaJob) -> dict:
    return {
        "training": f"{len(ARCHS)} architectures x {job.seeds} seeds, {job.train.max_tokens:,} tokens each "
                    f"({job.batch_size} windows of {job.seq_len} bytes per step) of the default human corpus, "
                    f"AdamW lr {job.train.lr} (warmup {job.train.warmup_steps} steps, cosine to 10%), the same batches for a seed",
        "heldout": f"perplexity per byte and bits per byte on LAMBADA passages (eval.perplexity.HELDOUT, windows of "
                   f"{job.seq_len} bytes, {'all' if job.eval_tokens is None else job.eval_tokens} tokens)",
        "decode": f"ms per decode step of {job.decode_batch} rows (one new token each) whose decode state holds "
                  f"C tokens, mean of {job.decode_tokens} steps, median of {job.decode_repeats} interleaved runs; "
                  "every architecture through the model's torch forward over a DecodeState (the engine's runner "
                  "path for non-Llama mixers; the fused C step, which covers only all-attention models, is not "
                  "used, so all are timed alike)",
        "recall": f"multi-query associative recall (Zoology's MQAR, train/recall.py): vocabulary {job.recall_vocab}, "
                  f"{job.recall_seq_len} tokens, {job.recall_pairs} key-value pairs each queried once; each "
                  f"architecture narrowed to widths {list(job.recall_widths)} with {job.recall_layers} layers, "
                  f"trained {job.recall_steps} steps of {job.recall_batch} sequences (lr {job.recall_lr}), one seed; "
                  "accuracy = exact greedy value at the queried positions, on fresh sequences",
        "parameters": "eval.efficiency.parameter_count / active_parameter_count; the *-arena presets match total "
                      "parameters within 5%, moe-arena-active matches dense-arena's active parameters",
    }


# --- saving -------------------------------------------------------------------------------------

def plot(result: dict, out: Path) -> list[Path]:
    """arena_decode.png (ms/step and state bytes vs context), arena_ppl.png (held-out perplexity with its
    spread), arena_recall.png (recall accuracy vs width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = result["archs"]
    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for arch, r in archs.items():
        cs = [int(c) for c in r["decode_ms"]]
        a1.plot(cs, [r["decode_ms"][str(c)]["median"] for c in cs], marker="o", label=arch)
        a2.plot(cs, [r["decode_state_bytes"]["by_context"][str(c)] / 2**20 for c in cs], marker="o", label=arch)
    for a, title, ylabel in ((a1, "decode step vs context", "ms per step"),
                             (a2, "decode state per sequence", "MiB (fp32)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("tokens of context")
        a.set_ylabel(ylabel)
        a.set_title(title)
        a.legend(fontsize=8)
    a2.set_yscale("log")
    fig.tight_layout()
    paths.append(out / "arena_decode.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(archs)
    ppl = [archs[a]["heldout_perplexity"] for a in names]
    spread = [[p["mean"] - p["min"] for p in ppl], [p["max"] - p["mean"] for p in ppl]]
    ax.bar(names, [p["mean"] for p in ppl], yerr=spread, capsize=4, color="tab:blue")
    ax.set_ylabel("held-out perplexity per byte (LAMBADA)")
    ax.set_title(f"mean over {result['job']['seeds']} seeds (bars: min..max)")
    ax.set_ylim(min(p["min"] for p in ppl) * 0.95, max(p["max"] for p in ppl) * 1.02)
    fig.tight_layout()
    paths.append(out / "arena_ppl.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, acc in result["recall"]["accuracy"].items():
        ws = [int(w) for w in acc]
        ax.plot(ws, [acc[str(w)] for w in ws], marker="o", label=arch)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(0, 1.02)
    task = result["recall"]["config"]
    ax.set_title(f"MQAR: {task['n_pairs']} pairs in {task['seq_len']} tokens, {result['recall']['steps']} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "arena_recall.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def run_arena(job: ArenaJob, command: str | None = None, json_name: str = "arena.json") -> Path:
    """Run the arena, write out/arena.json (a run record of `command`, `lilliput arena [--quick]` when
    omitted) and the plots beside it; the JSON's path."""
    command = command or "lilliput arena" + (" --quick" if job.quick else "")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    result = arena(job)
    result["plots"] = [p.name for p in plot(result, out)]
    path = write_json(out / json_name, run_record(command, **result))
    took, guess = result["seconds"]["total"] / 60, result["estimate_seconds"]["total"] / 60
    log(f"wrote {path} ({took:.1f} min; estimated {guess:.1f})")
    return path
