"""The collapse lab's generational loop: generations trained on their predecessors' text, through a ledger.

The loop (`run_lab`), shared by every scale (the toys in collapse_toys.py, small
GPTs in collapse_gpt.py): generation 0 trains on human documents; the model of generation g writes
as many documents as the human set holds, each continuing the opening of a parent document of its
own training set; they enter a provenance ledger (data/ledger.py) as generation g+1 with the
generator's fingerprint, sampling settings, seed and parent id; the training set of generation
g+1 is whatever `Ledger.select` picks for the policy:

- replace: the latest generation only (Shumailov et al. 2024: collapse),
- accumulate: all human and all synthetic documents so far (Gerstgrasser et al. 2024: none),
- fraction: a fixed share of human documents, the rest synthetic from every generation.

Each (sampling, policy, seed) chain has its own ledger file. Every generation is measured on
held-out human text: perplexity, and the diversity of what the model writes (distinct-1/2/3,
unigram entropy, unigram KL to the held-out text, coverage of its rare words and word pairs:
eval/diversity.py), all over lower-cased words.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from lilliput.data.ledger import Entry, Generator, Ledger, SelectionConfig
from lilliput.eval.diversity import distinct_n, tail_coverage, unigram_entropy, unigram_kl
from lilliput.eval.efficiency import spread

POLICIES = ("replace", "accumulate", "fraction")
_WORD = re.compile(r"\w+|[^\w\s]")


# --- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """How a generation writes: temperature 1, optionally truncated to the top-p nucleus."""

    name: str
    temperature: float = 1.0
    top_p: float | None = None

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p}


def samplings(names: tuple[str, ...], top_p: float) -> list[Sampling]:
    """"pure" (temperature 1) and "top_p" (temperature 1, nucleus `top_p`) by name."""
    known = {"pure": Sampling("pure"), "top_p": Sampling("top_p", top_p=top_p)}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"samplings must be among {', '.join(known)}, got {', '.join(names) or 'none'}")
    return [known[n] for n in names]


def selection(policy: str, human_fraction: float, seed: int) -> SelectionConfig:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return SelectionConfig(policy=policy, human_fraction=human_fraction, seed=seed)


# --- text measures --------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: the unit of every text measure of the lab."""
    return _WORD.findall(text.lower())


def text_metrics(generated: list[str], reference: list[list[str]]) -> dict[str, float]:
    """Diversity of generated texts and their distance to reference (held-out human) word lists."""
    gen = [words(t) for t in generated]
    gen_counts, ref_counts = Counter(w for g in gen for w in g), Counter(w for r in reference for w in r)
    return {"distinct_1": distinct_n(gen, 1), "distinct_2": distinct_n(gen, 2), "distinct_3": distinct_n(gen, 3),
            "unigram_entropy": unigram_entropy(gen_counts), "unigram_kl": unigram_kl(ref_counts, gen_counts),
            "tail_coverage": tail_coverage(gen, reference, n=1), "tail_coverage_2": tail_coverage(gen, reference, n=2)}


def band(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and spread (median, p90, min, max, n) of one figure over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), **spread(values)}


# --- the loop -----------------------------------------------------------------------------------

class Learner(Protocol):
    """What the loop needs of a scale (the bigram in collapse_toys.py, small GPTs in collapse_gpt.py)."""

    def fit(self, texts: list[str], seed: int) -> Any: ...
    def perplexity(self, model: Any) -> float: ...
    def fingerprint(self, model: Any) -> str: ...
    def sample(self, model: Any, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[str]: ...


def human_entries(chunks: list[tuple[str, str, str]]) -> list[Entry]:
    """Ledger entries of human training documents: (id, source, text) each."""
    return [Entry(text=t, id=f"human/{i}", source=src, file=i, origin="human") for i, src, t in chunks]


def write_generation(learner: Learner, model: Any, parents: list[tuple[str, str]], n: int, sampling: Sampling,
                     seed: int, generation: int, label: str) -> list[Entry]:
    """n synthetic documents of generation `generation`, each continuing a parent drawn from `parents`
    (id, text) without replacement (the training set of the model that writes them)."""
    rng = random.Random(f"{seed}/{generation}/{sampling.name}")
    picked = rng.sample(parents, n) if len(parents) >= n else [rng.choice(parents) for _ in range(n)]
    base = (seed * 1_000 + generation) * 1_000_003
    seeds = [base + i for i in range(n)]
    texts = learner.sample(model, [t for _, t in picked], sampling, seeds)
    fp = learner.fingerprint(model)
    return [Entry(text=t, id=f"synthetic/g{generation}/{i:05d}", origin="synthetic", generation=generation,
                  source=f"collapse lab: {label}", parents=(pid,),
                  generator=Generator(model=fp, sampling=sampling.settings(), seed=s))
            for i, (t, (pid, _), s) in enumerate(zip(texts, picked, seeds))]


def first_generation(learner: Learner, people: list[Entry], sampling: list[Sampling], seed: int,
                     reference: list[list[str]], metric_documents: int | None = None, model: Any = None
                     ) -> dict[str, Any]:
    """Generation 0 of one seed, shared by every chain of the seed: trained on the human documents
    (unless `model` is given: trained already), measured, and the documents it writes for generation 1
    under each sampling (as many as the human set holds).
    Returns {"model", "perplexity", "first": {sampling: entries}, "metrics": {sampling: {...}}}."""
    if model is None:
        model = learner.fit([e.text for e in people], seed=seed * 1_000)
    ppl = learner.perplexity(model)
    parents = [(e.id, e.text) for e in people]
    first, metrics = {}, {}
    for s in sampling:
        first[s.name] = write_generation(learner, model, parents, len(people), s, seed, 1, f"generation 0, {s.name}")
        metrics[s.name] = {"generation": 0, "perplexity": ppl, "train_documents": len(people), "human_share": 1.0,
                           **text_metrics([e.text for e in first[s.name][:metric_documents]], reference)}
    return {"model": model, "perplexity": ppl, "first": first, "metrics": metrics}


def run_chain(learner: Learner, people: list[Entry], first: list[Entry], m0: dict[str, Any], ledger_path: Path | str,
              *, policy: str, sampling: Sampling, seed: int, generations: int, reference: list[list[str]],
              human_fraction: float = 0.5, metric_documents: int | None = None, label: str = "",
              log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Generations 1 .. generations-1 of one chain, from generation 0's measurements `m0` and the
    documents it wrote (`first`); returns the per-generation measurements, m0 first.

    The chain's ledger (rewritten) holds the human documents and every generation's documents, with
    their generators and parents. Every generation but the last writes as many documents as the
    human set holds (the next one's data); the last writes only the `metric_documents` (default:
    all) that the text measures of every generation read."""
    policy_sel = selection(policy, human_fraction, seed)
    label = label or f"{policy}, {sampling.name}"
    path = Path(ledger_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    curve = [m0]
    with Ledger.open(path) as ledger:
        ledger.add_many(people)
        ledger.add_many(first)
        for g in range(1, generations):
            t0 = time.perf_counter()
            sel = ledger.select(policy_sel)
            texts = list(ledger.texts(sel.ids))
            model = learner.fit([t for _, t in texts], seed=seed * 1_000 + g)
            ppl = learner.perplexity(model)
            n = len(people) if g < generations - 1 else min(len(people), metric_documents or len(people))
            made = write_generation(learner, model, texts, n, sampling, seed, g + 1, f"generation {g}, {label}")
            ledger.add_many(made)
            human_n = sum(i.startswith("human/") for i in sel.ids)
            curve.append({"generation": g, "perplexity": ppl, "train_documents": len(sel.ids),
                          "human_share": human_n / len(sel.ids), "selection": sel.digest[:16],
                          **text_metrics([e.text for e in made[:metric_documents]], reference)})
            log(f"seed {seed} {label} generation {g}: perplexity {ppl:.3f}, tail coverage "
                f"{curve[-1]['tail_coverage']:.3f} ({time.perf_counter() - t0:.1f} s)")
    return curve


def run_lab(learner: Learner, human: list[tuple[str, str, str]], heldout: list[str], ledgers: Path | str, *,
            generations: int, policies: tuple[str, ...], sampling: list[Sampling], seeds: int,
            human_fraction: float = 0.5, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every chain's measurements, one process: {sampling: {policy: [per seed: [per generation: {...}]]}}.

    `human` is the human training set as (id, source, text); every chain's ledger
    (ledgers/<sampling>-<policy>-seed<k>.sqlite) holds it, the synthetic documents of its
    generations, their generators and parents."""
    if generations < 2:
        raise ValueError(f"generations must be >= 2 (0 is the human one), got {generations}")
    if not human or not heldout:
        raise ValueError("the lab needs human training documents and held-out human text")
    ref = [words(t) for t in heldout]
    people = human_entries(human)
    runs: dict[str, dict[str, list]] = {s.name: {p: [] for p in policies} for s in sampling}
    for seed in range(seeds):
        t0 = time.perf_counter()
        g0 = first_generation(learner, people, sampling, seed, ref)
        log(f"seed {seed} generation 0: perplexity {g0['perplexity']:.3f} ({time.perf_counter() - t0:.1f} s)")
        for s in sampling:
            for policy in policies:
                runs[s.name][policy].append(run_chain(
                    learner, people, g0["first"][s.name], g0["metrics"][s.name],
                    Path(ledgers) / f"{s.name}-{policy}-seed{seed}.sqlite", policy=policy, sampling=s, seed=seed,
                    generations=generations, reference=ref, human_fraction=human_fraction, log=log))
    return runs


METRICS = ("perplexity", "tail_coverage", "tail_coverage_2", "distinct_1", "distinct_2", "distinct_3",
           "unigram_entropy", "unigram_kl", "human_share")


def curves(runs: dict[str, Any]) -> dict[str, Any]:
    """Per sampling and policy: each metric per generation as mean, std, min, max over seeds, and the runs."""
    out: dict[str, Any] = {}
    for s, by_policy in runs.items():
        out[s] = {}
        for p, chains in by_policy.items():
            G = len(chains[0])
            out[s][p] = {"generation": list(range(G))}
            for m in METRICS:
                per = [[c[g][m] for c in chains] for g in range(G)]
                bands = [band(v) for v in per]
                out[s][p][m] = {k: [b[k] for b in bands] for k in ("mean", "std", "min", "max")} | {
                    "runs": [[c[g][m] for g in range(G)] for c in chains]}
    return out


def growth(curve: dict[str, Any], metric: str = "perplexity") -> float:
    """Mean (over seeds) of the last generation / mean of generation 0."""
    mean = curve[metric]["mean"]
    return mean[-1] / mean[0]


def seed_growth(chains: list[list[dict[str, Any]]], metric: str = "perplexity") -> dict[str, Any]:
    """Last generation / generation 0 of each seed's chain: mean, std, spread over seeds, and the runs."""
    ratios = [c[-1][metric] / c[0][metric] if c[0][metric] else None for c in chains]
    known = [r for r in ratios if r is not None]  # a figure that starts at 0 has no ratio
    return {**(band(known) if known else {}), "runs": ratios}


def chunks_of(docs, size: int, unit: str = "bytes") -> list[tuple[str, str, str]]:
    """Documents cut into pieces of `size` UTF-8 bytes (never inside a character) or `size` words,
    as (id, source, text); an id is "<document id>@<index>"."""
    out = []
    for d in docs:
        if unit == "words":
            w = d.text.split()
            pieces = [" ".join(w[i:i + size]) for i in range(0, len(w) - size + 1, size)]
        else:
            raw = d.text.encode("utf-8")
            pieces = [raw[i:i + size].decode("utf-8", errors="ignore") for i in range(0, len(raw) - size + 1, size)]
        out += [(f"{d.id}@{k}", d.source, p) for k, p in enumerate(pieces) if p.strip()]
    return out


def split_chunks(chunks: list, train: int, heldout: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint random (train, held-out) sets of chunks, the same for every seed of the lab."""
    if train + heldout > len(chunks):
        raise ValueError(f"the corpus holds {len(chunks)} pieces, fewer than {train} + {heldout} asked for: "
                         "lower documents or heldout_documents")
    picked = random.Random(seed).sample(chunks, train + heldout)
    return picked[:train], picked[train:]
