"""The whole collapse lab: the toy scales, the GPT scale on worker processes, the watermark loop, the summary.

Three scales, one loop (collapse.py; every document through a provenance ledger, each generation's
training set chosen by `Ledger.select` for the policy):

1. a Gaussian refitted to its own samples (seconds; variance under replace vs accumulate);
2. a count-based word bigram model over corpus pieces (seconds);
3. small GPTs trained from scratch (collapse_gpt.py) under both budget rules: equal tokens per
   generation (equal compute) and equal passes.

The GPT scale is a set of tasks (collapse_gpt.tasks): each seed's generation 0 (trained once, its
held-out curve recorded, its documents written once, shared by every chain of the seed), then the
chains, then a control (seed 0's generation 0 trained twice as long: does longer training still
help?). They run on `workers` processes (spawned; each on cfg.threads torch threads), the toys in
this process meanwhile.

The watermark closes the loop: generation 0 of seed 0 writes documents through the Kirchenbauer
watermark (data/watermark.py), they are mixed with human pieces into a "scraped" set, the detector
scores every piece, and the verdict routes it into a ledger as synthetic (with the key id) or human;
the report counts true and false positives.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import torch

from lilliput.core.model import GPT
from lilliput.data.ledger import Entry, Generator, Ledger, SelectionConfig
from lilliput.data.watermark import Detector, Watermark, WatermarkConfig, key_id
from lilliput.eval.efficiency import parameter_count
from lilliput.train.collapse import (Sampling, band, chunks_of, curves, first_generation, growth, human_entries,
                                     run_chain, run_lab, samplings, seed_growth, split_chunks, words)
from lilliput.train.collapse_gpt import (RULES, CollapseConfig, GPTLearner, budget_tokens, chains, doc_tokens,
                                         estimate_seconds, lab_tokenizer, tasks, work)
from lilliput.train.collapse_toys import BigramLearner, gaussian_study
from lilliput.train.data import default_documents

SHOWS = (
    "Held-out perplexity (human pieces never trained on) of small GPTs trained from scratch, generation after "
    "generation, on text written by their predecessors, with the training set chosen by policy (replace: the "
    "latest generation only; accumulate: all human and synthetic text so far), under two budget rules side by "
    "side: equal tokens per generation (equal_compute) and equal passes over each training set (equal_passes).",
    "Growth = last generation / generation 0 of each seed's chain; means, std, min, max and the per-seed values "
    "over seeds. Generation 0 (model and the text it writes) is the same for every chain of a seed.",
    "Tails per generation: how much of the held-out text's rare words and rare word pairs the generation's "
    "text still uses (tail_coverage, tail_coverage_2), distinct-n, unigram entropy and KL to the held-out text.",
    "How converged generation 0 is: its held-out curve, and a control that trains seed 0's generation 0 for "
    "control_factor times the tokens (gpt.generation0.control).",
)
DOES_NOT_SHOW = (
    "Anything about large models or web-scale data: the GPTs have ~10^5 parameters and the human set is ~2 MB of "
    "public-domain books, the Bible and State of the Union addresses.",
    "Convergence beyond what gpt.generation0.control measures: if training twice as long still lowers held-out "
    "perplexity, generation 0 is not fully converged, and a rule that trains later generations longer "
    "(equal_passes under accumulate) gains from the extra compute as well as from the data.",
    "Top-p sampling or the fixed-fraction policy in the full run (left out for time; --samplings pure,top_p and "
    "--policies replace,accumulate,fraction run them).",
    "Detection of synthetic text in general: the watermark loop detects only the lab's own watermark.",
)


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



# --- the GPT scale's tasks (each runs in a worker process, or here when workers=1) ----------------

_SHARED: dict[str, Any] = {}


def _share(shared: dict[str, Any]) -> None:
    """Worker start: what every task needs (config, tokenizer, human and held-out texts), set once."""
    _SHARED.clear()
    _SHARED.update(shared, people=human_entries(shared["human"]), reference=[words(t) for t in shared["heldout"]])
    if shared["cfg"].threads is not None:
        torch.set_num_threads(shared["cfg"].threads)


def _say(message: str) -> None:
    print(message, flush=True)


def run_task(task: tuple[str, ...], first: list[Entry] | None = None, m0: dict | None = None) -> dict[str, Any]:
    """One task of collapse_gpt.tasks: a seed's generation 0, a chain (given that seed's generation 0
    documents `first` and measurements `m0`), or the control."""
    sh, t0 = _SHARED, time.perf_counter()
    cfg = sh["cfg"]
    budget = task[4] if task[0] == "chain" else "tokens"
    learner = GPTLearner(cfg, sh["tokenizer"], sh["heldout"], sh["new_tokens"], budget=budget, device=sh["device"])
    human = [e.text for e in sh["people"]]
    if task[0] == "first":
        seed = int(task[1])
        model = learner.fit(human, seed=seed * 1_000, curve=True)
        g0 = first_generation(learner, sh["people"], samplings(cfg.samplings, cfg.top_p), seed, sh["reference"],
                              cfg.metric_documents, model=model)
        _say(f"seed {seed} generation 0: perplexity {g0['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)")
        return {"perplexity": g0["perplexity"], "curve": learner.curve, "first": g0["first"], "metrics": g0["metrics"],
                "state": model.state_dict() if seed == 0 else None, "seconds": time.perf_counter() - t0}
    if task[0] == "control":
        tokens = round(cfg.control_factor * cfg.train.max_tokens)
        model = learner.fit(human, seed=0, tokens=tokens, curve=True)
        _say(f"control: seed 0 generation 0 on {tokens:,} tokens ({time.perf_counter() - t0:.0f} s)")
        return {"tokens": tokens, "perplexity": learner.perplexity(model), "curve": learner.curve,
                "seconds": time.perf_counter() - t0}
    _, seed, sampling, policy, *budgets = task
    s = samplings((sampling,), cfg.top_p)[0]
    label = f"{policy} ({'/'.join(budgets)}), {sampling}"
    curve = run_chain(learner, sh["people"], first, m0, Path(sh["ledgers"]) / f"{sampling}-{policy}-{'-'.join(budgets)}"
                      f"-seed{seed}.sqlite", policy=policy, sampling=s, seed=int(seed), generations=cfg.generations,
                      reference=sh["reference"], human_fraction=cfg.human_fraction,
                      metric_documents=cfg.metric_documents, label=label, log=_say)
    return {"curve": curve, "seconds": time.perf_counter() - t0}


class _Here:
    """An executor that runs each task at once, in this process (workers=1)."""

    def __init__(self, shared: dict[str, Any]):
        _share(shared)

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_tasks(cfg: CollapseConfig, shared: dict[str, Any], meanwhile: Callable[[], None] = lambda: None
              ) -> dict[tuple[str, ...], dict[str, Any]]:
    """Every task of the GPT scale, started in `tasks` order as workers free up (a chain once its seed's
    generation 0 is done); `meanwhile` runs here once the first tasks are under way."""
    todo, results, running = list(tasks(cfg)), {}, {}
    pool = (_Here(shared) if cfg.workers == 1 else
            ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_share,
                                initargs=(shared,)))

    def start() -> None:
        while todo and len(running) < cfg.workers:
            ready = [t for t in todo if t[0] != "chain" or ("first", t[1]) in results]
            if not ready:
                return
            t = ready[0]
            todo.remove(t)
            extra = ()
            if t[0] == "chain":
                g0 = results[("first", t[1])]
                extra = (g0["first"][t[2]], g0["metrics"][t[2]])
            running[pool.submit(run_task, t, *extra)] = t

    with pool:
        start()
        meanwhile()
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                results[running.pop(f)] = f.result()
            start()
    return results


# --- the summary ----------------------------------------------------------------------------------

TEXT_RATIOS = ("tail_coverage", "tail_coverage_2", "distinct_1", "distinct_2", "distinct_3", "unigram_entropy",
               "unigram_kl")


def budget_summary(cfg: CollapseConfig, budget: str, runs: dict[str, dict[str, list]], head: str,
                   plan: list[tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
    """One budget rule's results for the headline sampling: per policy, last generation / generation 0
    of each seed (mean, std, spread and the runs) for perplexity and the text measures."""
    chains_ = runs[head]
    out: dict[str, Any] = {"budget": budget, "rule": RULES[budget], "sampling": head, "seeds": cfg.seeds,
                           "generations": cfg.generations}
    out |= {f"{p}_ppl_growth": seed_growth(chains_[p])["mean"] for p in cfg.policies}
    out["ppl_growth"] = {p: seed_growth(chains_[p]) for p in cfg.policies}
    out["perplexity"] = {p: [band([c[g]["perplexity"] for c in chains_[p]])["mean"] for g in range(cfg.generations)]
                         for p in cfg.policies}
    out |= {f"{m}_ratio": {p: seed_growth(chains_[p], m) for p in cfg.policies} for m in TEXT_RATIOS}
    out["train_tokens"] = {p: budget_tokens(cfg, p, budget) for p in cfg.policies}
    out["same_chain_as"] = {p: [b for b in bs if b != budget] for p, bs in plan if budget in bs}
    if len(runs) > 1:
        out["ppl_growth_by_sampling"] = {s: {p: seed_growth(runs[s][p])["mean"] for p in cfg.policies} for s in runs}
    return out


def generation0_summary(cfg: CollapseConfig, results: dict, human_tokens: int) -> dict[str, Any]:
    """Generation 0's held-out curve over seeds, and the control (seed 0 trained control_factor x longer)."""
    curves0 = [results[("first", str(s))]["curve"] for s in range(cfg.seeds)]
    points = min(len(c) for c in curves0)
    out = {"train_tokens": cfg.train.max_tokens, "epochs": cfg.train.max_tokens / human_tokens,
           "curve": {"tokens": [p["tokens"] for p in curves0[0][:points]],
                     "perplexity": {k: [band([c[i]["perplexity"] for c in curves0])[k] for i in range(points)]
                                    for k in ("mean", "std", "min", "max")}
                     | {"runs": [[p["perplexity"] for p in c[:points]] for c in curves0]}}}
    control = results.get(("control",))
    if control is not None:
        base = results[("first", "0")]["perplexity"]
        out["control"] = {"seed": 0, "train_tokens": control["tokens"], "perplexity": control["perplexity"],
                          "perplexity_at_train_tokens": base, "ratio": control["perplexity"] / base,
                          "curve": control["curve"]}
    return out


# --- the whole lab ------------------------------------------------------------------------------

def run_collapse(cfg: CollapseConfig, out: Path | str, device: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three scales and the watermark loop; ledgers go under out/ledgers. Returns the result fields."""
    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    sampling = samplings(cfg.samplings, cfg.top_p)
    docs = default_documents(prefer_full=cfg.full_corpus)
    pieces = chunks_of(docs, cfg.doc_bytes)
    extra = cfg.watermark_documents
    if cfg.documents + cfg.heldout_documents + extra > len(pieces):
        raise ValueError(f"the corpus holds {len(pieces):,} pieces of {cfg.doc_bytes} bytes, fewer than the "
                         f"{cfg.documents + cfg.heldout_documents + extra:,} asked for: run `lilliput data fetch` for "
                         "the full corpus, or lower documents (--quick runs on the shipped sample)")
    train, held = split_chunks(pieces, cfg.documents, cfg.heldout_documents + extra)
    held, scrape_human = held[:cfg.heldout_documents], held[cfg.heldout_documents:]
    human, heldout = [t for _, _, t in train], [t for _, _, t in held]
    tokenizer = lab_tokenizer(cfg, human)
    new_tokens = doc_tokens(tokenizer, human)
    human_tokens = new_tokens * len(human)
    human_bytes = sum(len(t.encode("utf-8")) for t in human)
    estimate = estimate_seconds(cfg, tokenizer, heldout, new_tokens, device)
    w = work(cfg, new_tokens)
    log(f"collapse lab: human set {len(human):,} pieces, {human_bytes / 1e6:.2f} MB, {human_tokens:,} tokens "
        f"({human_bytes / human_tokens:.2f} bytes/token); {w['models']} GPTs, {w['train_tokens']:,} tokens trained "
        f"(generation 0: {cfg.train.max_tokens:,}, {cfg.train.max_tokens / human_tokens:.2f} epochs), "
        f"{w['tokens_written']:,} tokens written. Measured here on one thread: training "
        f"{estimate['train_tokens_per_s']:,} tok/s, writing {estimate['write_tokens_per_s']:,} tok/s; on "
        f"{cfg.workers} worker(s) with a core each: about {estimate['total_s'] / 60:.1f} minutes, plus about a "
        "minute for the toy scales")

    toys: dict[str, Any] = {}

    def run_toys() -> None:
        t0 = time.perf_counter()
        toys["gaussian"] = gaussian_study(cfg.gaussian_samples, cfg.gaussian_generations, seeds=20,
                                          policies=cfg.policies, human_fraction=cfg.human_fraction)
        train_w, held_w = split_chunks(chunks_of(docs, cfg.ngram_words, "words"), cfg.ngram_documents,
                                       cfg.heldout_documents)
        bigram = BigramLearner([t for _, _, t in train_w], [t for _, _, t in held_w], doc_words=cfg.ngram_words)
        runs = run_lab(bigram, train_w, [t for _, _, t in held_w], out / "ledgers" / "ngram",
                       generations=cfg.generations, policies=cfg.policies, sampling=sampling, seeds=cfg.seeds,
                       human_fraction=cfg.human_fraction)
        toys["ngram"], toys["vocabulary"] = curves(runs), len(bigram.vocab)
        log(f"toy scales: {time.perf_counter() - t0:.1f} s; bigram perplexity growth "
            + ", ".join(f"{s}/{p} {growth(c):.3f}" for s, by in toys["ngram"].items() for p, c in by.items()))

    shared = {"cfg": cfg, "tokenizer": tokenizer, "human": train, "heldout": heldout, "new_tokens": new_tokens,
              "ledgers": str(out / "ledgers" / "gpt"), "device": device}
    t0 = time.perf_counter()
    results = run_tasks(cfg, shared, meanwhile=run_toys)
    gpt_s = time.perf_counter() - t0

    plan = chains(cfg)
    runs = {b: {s.name: {p: [] for p in cfg.policies} for s in sampling} for b in cfg.budgets}
    for s in sampling:
        for p, bs in plan:
            for seed in range(cfg.seeds):
                for b in bs:  # a chain shared by several rules (replace) stands under each
                    runs[b][s.name][p].append(results[("chain", str(seed), s.name, p, *bs)]["curve"])
    head, head_budget = sampling[0].name, ("tokens" if "tokens" in cfg.budgets else cfg.budgets[0])
    summaries = {b: budget_summary(cfg, b, runs[b], head, plan) for b in cfg.budgets}
    gpt_curves = {b: curves(runs[b]) for b in cfg.budgets}

    watermark = None
    if extra:
        learner = GPTLearner(cfg, tokenizer, heldout, new_tokens, device=device)
        model0 = GPT(learner.model_cfg).to(device)
        model0.load_state_dict(results[("first", "0")]["state"])
        prompts = [t for _, _, t in random.Random(1).sample(train, extra)]
        watermark = scrape_and_route(learner, model0.eval(), [t for _, _, t in scrape_human], prompts,
                                     out / "ledgers" / "scraped.sqlite", cfg.watermark_delta)
        log(f"watermark: caught {watermark['true_positives']}/{watermark['synthetic']} synthetic, "
            f"{watermark['false_positives']}/{watermark['human']} human flagged")

    ngram = toys["ngram"]
    ppl_growth = {s: {p: seed_growth(runs[head_budget][s][p])["mean"] for p in cfg.policies} for s in runs[head_budget]}
    tail_change = {s: {p: seed_growth(runs[head_budget][s][p], "tail_coverage").get("mean") for p in cfg.policies}
                   for s in runs[head_budget]}
    return {
        **{f"{p}_ppl_growth": ppl_growth[head][p] for p in cfg.policies},
        "headline_sampling": head,
        "headline_budget": head_budget,
        "equal_compute": summaries.get("tokens"),
        "equal_passes": summaries.get("epochs"),
        "ppl_growth": ppl_growth,
        "tail_coverage_ratio": tail_change,
        "shows": SHOWS,
        "does_not_show": DOES_NOT_SHOW,
        "gpt": {"parameters": parameter_count(GPT(cfg.model_config(tokenizer.vocab_size))),
                "model": cfg.model_config(tokenizer.vocab_size).to_dict(),
                "tokenizer": {"kind": "bytes" if cfg.vocab_size is None else "byte-level BPE learnt from the human set",
                              "vocab_size": tokenizer.vocab_size, "bytes_per_token": human_bytes / human_tokens,
                              "tokens_per_document": new_tokens},
                "human": {"documents": len(human), "bytes": human_bytes, "tokens": human_tokens},
                "heldout": {"documents": len(heldout), "bytes": sum(len(t.encode("utf-8")) for t in heldout)},
                "corpus_documents": len(docs), "corpus_pieces": len(pieces), "seconds": round(gpt_s, 1),
                "budgets": list(cfg.budgets), "chains": [[p, list(bs)] for p, bs in plan],
                "train_tokens": {b: {p: budget_tokens(cfg, p, b) for p in cfg.policies} for b in cfg.budgets},
                "generation0": generation0_summary(cfg, results, human_tokens),
                "task_seconds": {"/".join(t): round(r["seconds"], 1) for t, r in results.items()},
                "curves": gpt_curves},
        "ngram": {"ppl_growth": {s: {p: growth(ngram[s][p]) for p in ngram[s]} for s in ngram},
                  "tail_coverage_ratio": {s: {p: growth(ngram[s][p], "tail_coverage") for p in ngram[s]}
                                          for s in ngram},
                  "vocabulary": toys["vocabulary"], "curves": ngram},
        "gaussian": toys["gaussian"],
        "watermark": watermark,
        "config": dataclasses.asdict(cfg),
        "estimate": estimate,
        "work": w,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
