"""The whole collapse lab: the toy scales, the GPT scale, and the watermark loop, in one call.

Three scales, one loop (collapse.run_lab; every document through a provenance ledger, each
generation's training set chosen by `Ledger.select` for the policy):

1. a Gaussian refitted to its own samples (seconds; variance under replace vs accumulate);
2. a count-based word bigram model over corpus pieces (seconds);
3. small GPTs trained from scratch (collapse_gpt.py).

The watermark closes the loop: generation 0 of seed 0 writes documents through the
Kirchenbauer watermark (data/watermark.py, byte vocabulary of 256), they are mixed with human
pieces into a "scraped" set, the detector scores every piece, and the verdict routes it into a
ledger as synthetic (with the key id) or human; the report counts true and false positives.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lilliput.core.model import GPT
from lilliput.data.ledger import Entry, Generator, Ledger, SelectionConfig
from lilliput.data.watermark import Detector, Watermark, WatermarkConfig, key_id
from lilliput.eval.efficiency import parameter_count
from lilliput.train.collapse import Sampling, chunks_of, curves, growth, run_lab, samplings, split_chunks
from lilliput.train.collapse_gpt import CollapseConfig, GPTLearner, estimate_seconds, work
from lilliput.train.collapse_toys import BigramLearner, gaussian_study
from lilliput.train.data import default_documents


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
