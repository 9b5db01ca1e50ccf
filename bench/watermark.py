"""Two watermarks on SmolLM2, side by side: Kirchenbauer et al.'s green list and the distortion-free
Gumbel-max scheme; detection power, perplexity cost and robustness.

SmolLM2-135M-Instruct continues varied prompts (openings of LAMBADA passages and of corpus
documents, `--prompt-tokens` each) at temperature 1.0 three times, same prompts and seeds, through
the engine (`--max-batch` rows at a time): plainly, with the green list (gamma, delta; `--new`
tokens, for its TPR-vs-length curve) and with the Gumbel-max watermark (`--length` tokens, as the
plain arm). Human text: `--human` passages cut from the default corpus (the fetched one, else the
shipped sample) and LAMBADA, tokenized by the same tokenizer; each is scored from its second token
on, as a generation is scored from its first (the token before gives the context).

Written to bench/results/watermark.json. The green list (top level, as before):

- `tpr_at_fpr_1e-3`: share of 200-token watermarked generations whose z exceeds the threshold
  that at most 0.1% of human passages exceed (the empirical false-positive rate <= 1e-3), with a
  Clopper-Pearson 95% interval over generations; `_retokenized`: after decoding the generation to
  text and tokenizing it again;
- `by_length`: that TPR, its threshold and the TPR at the fixed z = 4, for 25 .. `--new` tokens;
- `by_entropy`: TPR at 200 tokens within quartiles of the generations' mean next-token entropy
  under the plain model (low-entropy text leaves a watermark little room);
- `ppl_cost`: perplexity of the watermarked generations / of the plain ones, both under the
  plain (unwatermarked) model, over their first 200 tokens, with a 95% bootstrap interval
  (prompts resampled, each with its plain and its watermarked continuation);
- `robustness`: TPR at 200 tokens after replacing 10% / 20% / 30% of the tokens by random ones;
- `human_z`: mean and standard deviation of z on human text (should be ~0 and ~1).

`distortion_free`: the same for the Gumbel-max watermark (lilliput.data.gumbel_watermark), whose
p-value is exact (Gamma(n, 1) tail), so its `tpr_at_fpr_1e-3` is the share with p <= 1e-3, no
threshold fitted; `human` checks that exactness on human text (share of p-values under 1e-3, 0.01,
0.05 and their Kolmogorov-Smirnov distance from uniform), and `plain_fpr` on the plain generations.
`excess_nll` (both schemes) is the mean of a token's NLL minus its context's entropy under the
plain model: 0 in expectation for any exact sample of the model, a lower-variance view of the
perplexity cost than the ratio of two independent arms.

What it shows: detection at 200 tokens against an exact (Gumbel) or empirical (green list) 0.1%
false-positive rate, the perplexity cost measured by the plain model, and survival of random token
substitution. What it does not show: robustness to paraphrase, insertion, deletion or
translation; security against key recovery or spoofing (one previous token seeds each hash, which
an attacker with many samples can learn); other models, temperatures, top-k / top-p; diversity
across samples of one prompt (the Gumbel watermark writes the same text for a prompt and key,
except where a context repeats). One key throughout; the green list's threshold comes from the
human passages and its uncertainty is not in the TPR interval.

    .venv/bin/python bench/watermark.py                      # the full run
    .venv/bin/python bench/watermark.py --generations 4 --human 20 --new 60 --length 50 --lengths 25,50   # smoke
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lilliput.core.checkpoint import load_model
from lilliput.core.record import run_record, write_json
from lilliput.data.gumbel_watermark import GumbelConfig, GumbelDetector, GumbelWatermark
from lilliput.data.watermark import Detector, Watermark, WatermarkConfig, binomial_sf, key_id
from lilliput.eval.task_sets import lambada_passages
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.train.data import default_documents

OUT = Path(__file__).parent / "results" / "watermark.json"
FPR = 1e-3
RATES = (0.1, 0.2, 0.3)


def human_windows(tok, n: int, length: int, skip_lambada: int) -> tuple[list[list[int]], dict]:
    """n windows of `length` tokens: half from corpus documents (as many as they hold), the rest from
    LAMBADA passages (joined, since each is ~80 tokens), never overlapping; LAMBADA's last
    `skip_lambada` passages are left for prompts."""
    windows: list[list[int]] = []
    docs = default_documents()
    per_doc = max(1, math.ceil((n // 2) / len(docs)))
    for d in docs:
        ids = tok.encode(d.text[: (per_doc + 1) * length * 8], bos=False)
        windows += [ids[i * length:(i + 1) * length] for i in range(min(per_doc, len(ids) // length))]
    corpus = windows[: n // 2]
    passages = lambada_passages()[:-skip_lambada]
    stream: list[int] = []
    need = (n - len(corpus)) * length
    for p in passages:
        stream += tok.encode(p + "\n\n", bos=False)
        if len(stream) >= need:
            break
    lam = [stream[i * length:(i + 1) * length] for i in range(min(n - len(corpus), len(stream) // length))]
    return corpus + lam, {"corpus": len(corpus), "lambada": len(lam), "corpus_documents": len(docs)}


def prompts_for(tok, n: int, prompt_tokens: int) -> list[list[int]]:
    """Openings of the last LAMBADA passages, alternating with openings of corpus documents."""
    lam = lambada_passages()[-n:]
    docs = default_documents()
    out = []
    for i in range(n):
        text = lam[i] if i % 2 == 0 or not docs else docs[(i // 2) % len(docs)].text[(i // 2) * 997 % 4000:]
        ids = tok.encode(text, bos=False)[:prompt_tokens]
        if len(ids) < prompt_tokens:  # a short passage: take the next one too
            ids = (ids + tok.encode(lam[(i + 1) % n], bos=False))[:prompt_tokens]
        out.append(ids)
    return out


def threshold_at(human: np.ndarray, fpr: float) -> float:
    """Smallest z that at most a share `fpr` of human z-scores exceed (strictly)."""
    k = int(math.floor(fpr * len(human)))  # false positives allowed
    return float(np.sort(human)[::-1][k])


@torch.inference_mode()
def nll_and_entropy(model, seqs: list[list[int]], prompt_len: int, n: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: mean NLL of its first n generated tokens and mean entropy of the model's
    next-token distribution at those positions (nats), under `model`."""
    device = next(model.parameters()).device
    nll, ent = [], []
    for i in range(0, len(seqs), batch):
        idx = torch.tensor([s[:prompt_len + n] for s in seqs[i:i + batch]], device=device)  # (B, T)
        logits = model(idx)[:, prompt_len - 1:prompt_len + n - 1].float()  # (B, n, V): predicts the generated tokens
        logp = torch.log_softmax(logits, -1)
        target = idx[:, prompt_len:prompt_len + n]
        nll += (-logp.gather(-1, target[..., None])[..., 0]).mean(1).tolist()
        ent += (-(logp.exp() * logp).sum(-1)).mean(1).tolist()
    return np.array(nll), np.array(ent)


def replace_tokens(out: list[int], rate: float, vocab: int, rng: random.Random) -> list[int]:
    out = list(out)
    for i in rng.sample(range(len(out)), round(rate * len(out))):
        out[i] = rng.randrange(vocab)
    return out


def substitution_rng(seed: int, rate: float, i: int) -> random.Random:
    """The same positions and tokens for generation i of either scheme at one rate."""
    return random.Random(seed * 1_000_003 + round(rate * 100) * 10_007 + i)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Exact binomial interval of a proportion k / n (a bootstrap degenerates at k = n)."""
    a = (1 - level) / 2

    def solve(f, target: float) -> float:  # f increasing in p
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: binomial_sf(k, n, p), a)
    upper = 1.0 if k == n else solve(lambda p: binomial_sf(k + 1, n, p), 1 - a)
    return [round(lower, 4), round(upper, 4)]


def rate_with_ci(hits: np.ndarray) -> dict:
    k, n = int(hits.sum()), int(hits.shape[0])
    return {"rate": k / n, "k": k, "n": n, "ci95": clopper_pearson(k, n)}


def ppl_ratio_ci(nll_marked: np.ndarray, nll_plain: np.ndarray, seed: int, draws: int = 2000) -> list[float]:
    """95% percentile bootstrap of exp(mean NLL marked - mean NLL plain), prompts resampled in pairs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll_plain), (draws, len(nll_plain)))  # (draws, n)
    ratios = np.exp(nll_marked[idx].mean(1) - nll_plain[idx].mean(1))
    return [round(float(x), 4) for x in np.quantile(ratios, [0.025, 0.975])]


def mean_ci(x: np.ndarray, seed: int, draws: int = 2000) -> dict:
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, len(x), (draws, len(x)))].mean(1)
    return {"mean": round(float(x.mean()), 4), "ci95": [round(float(q), 4) for q in np.quantile(boot, [0.025, 0.975])]}


def ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of p-values from Uniform(0, 1)."""
    p = np.sort(p)
    i = np.arange(1, len(p) + 1)
    return float(max((i / len(p) - p).max(), (p - (i - 1) / len(p)).max()))


def by_entropy_tpr(ent: np.ndarray, hits: np.ndarray) -> list[dict]:
    edges = np.quantile(ent, [0.0, 0.25, 0.5, 0.75, 1.0])
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (ent >= lo) & (ent <= hi)
        out.append({"entropy_nats": [round(float(lo), 3), round(float(hi), 3)], "n": int(inside.sum()),
                    "tpr": float(hits[inside].mean()) if inside.any() else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=200,
                    help="prompts (each continued plainly and with each watermark)")
    ap.add_argument("--human", type=int, default=1000, help="human passages")
    ap.add_argument("--new", type=int, default=400,
                    help="tokens the green list generates per prompt (>= the longest length)")
    ap.add_argument("--length", type=int, default=200, help="tokens scored for the headline TPR and ppl_cost (and "
                    "generated by the plain and Gumbel arms)")
    ap.add_argument("--lengths", default="25,50,100,200,400", help="lengths of the TPR-vs-length curve")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gamma", type=float, default=WatermarkConfig.gamma)
    ap.add_argument("--delta", type=float, default=WatermarkConfig.delta)
    ap.add_argument("--context-width", type=int, default=GumbelConfig.context_width, help="of the Gumbel watermark")
    ap.add_argument("--key", default="lilliput-bench-key")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--score-batch", type=int, default=4, help="sequences per forward when scoring perplexity")
    ap.add_argument("--model", default=None, help="model to watermark (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    lengths = sorted({int(x) for x in args.lengths.split(",")} | {args.length})
    lengths = [L for L in lengths if L <= args.new]
    if args.length > args.new:
        ap.error(f"--length {args.length} is longer than --new {args.new}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    model, tok = load_model(args.model, device=args.device)
    wcfg = WatermarkConfig(gamma=args.gamma, delta=args.delta)
    wm, det = Watermark(args.key, wcfg), Detector(args.key, wcfg)
    gcfg = GumbelConfig(context_width=args.context_width)
    gwm, gdet = GumbelWatermark(args.key, gcfg), GumbelDetector(args.key, gcfg)

    # human text: one window of max(lengths) + 1 tokens each, scored from its second token
    human, human_sources = human_windows(tok, args.human, max(lengths) + 1, skip_lambada=args.generations)
    if len(human) < args.human:
        print(f"only {len(human)} human windows of {max(lengths) + 1} tokens available", file=sys.stderr)
    human_z = {L: np.array([det.detect(w[:L + 1], prompt_len=1).z for w in human]) for L in lengths}
    human_p = {L: np.array([gdet.detect(w[:L + 1], prompt_len=1).p_value for w in human]) for L in lengths}

    # generations: plain, green list, Gumbel; same prompts and seeds
    prompts = prompts_for(tok, args.generations, args.prompt_tokens)
    engine = Engine(model, tok, EngineConfig(max_batch=args.max_batch, max_len=args.prompt_tokens + args.new))
    marked, plain, gumbel = [], [], []
    for i, p in enumerate(prompts):
        cfg = GenerationConfig(max_new_tokens=args.new, temperature=1.0, seed=args.seed + i, ignore_eos=True)
        short = GenerationConfig(max_new_tokens=args.length, temperature=1.0, seed=args.seed + i, ignore_eos=True)
        marked.append(engine.add(p, cfg, processors=[wm]))
        plain.append(engine.add(p, short))
        gumbel.append(engine.add(p, short, processors=[gwm]))
    t_gen = time.perf_counter()
    engine.run()
    gen_s = time.perf_counter() - t_gen
    print(f"generated {len(prompts)} x ({args.new} + 2 x {args.length}) tokens in {gen_s:.0f}s", file=sys.stderr)
    P, L = args.prompt_tokens, args.length

    # the green list, as before
    by_length = {}
    for n in lengths:
        z = np.array([det.detect(s.tokens[:P + n], prompt_len=P).z for s in marked])
        t = threshold_at(human_z[n], FPR)
        by_length[str(n)] = {"tpr": float((z > t).mean()), "threshold_z": round(t, 3),
                             "tpr_at_z4": float((z >= 4).mean()), "human_fpr_at_z4": float((human_z[n] >= 4).mean()),
                             "median_z": round(float(np.median(z)), 2)}
    t200 = threshold_at(human_z[L], FPR)
    z_marked = np.array([det.detect(s.tokens[:P + L], prompt_len=P).z for s in marked])
    z_plain = np.array([det.detect(s.tokens[:P + L], prompt_len=P).z for s in plain])
    z_retok = np.array([det.detect_text(tok.decode(s.output[:L]), tok).z for s in marked])
    robustness = {}
    for rate in RATES:
        z = np.array([det.detect(s.tokens[:P] + replace_tokens(s.output[:L], rate, tok.vocab_size,
                                                                  substitution_rng(args.seed, rate, i)),
                                 prompt_len=P).z for i, s in enumerate(marked)])
        robustness[f"replace_{rate}"] = {"tpr": float((z > t200).mean()), "median_z": round(float(np.median(z)), 2)}

    # the Gumbel watermark: exact p-values, so the threshold is p <= 1e-3 itself
    gum_length = {}
    for n in [n for n in lengths if n <= L]:
        p = np.array([gdet.detect(s.tokens[:P + n], prompt_len=P).p_value for s in gumbel])
        gum_length[str(n)] = {"tpr": float((p <= FPR).mean()), "human_fpr": float((human_p[n] <= FPR).mean()),
                              "median_log10_p": round(float(np.median(np.log10(np.maximum(p, 1e-300)))), 1)}
    g_marked = [gdet.detect(s.tokens[:P + L], prompt_len=P) for s in gumbel]
    p_marked = np.array([d.p_value for d in g_marked])
    p_plain = np.array([gdet.detect(s.tokens[:P + L], prompt_len=P).p_value for s in plain])
    p_retok = np.array([gdet.detect_text(tok.decode(s.output[:L]), tok).p_value for s in gumbel])
    p_human = human_p[L]
    # the same rule as the green list's (a threshold at most 0.1% of human passages pass), for comparison
    t_human = threshold_at(-np.log10(np.maximum(p_human, 1e-300)), FPR)
    gum_robust = {}
    for rate in RATES:
        p = np.array([gdet.detect(s.tokens[:P] + replace_tokens(s.output[:L], rate, tok.vocab_size,
                                                                   substitution_rng(args.seed, rate, i)),
                                  prompt_len=P).p_value for i, s in enumerate(gumbel)])
        gum_robust[f"replace_{rate}"] = {"tpr": float((p <= FPR).mean()),
                                         "median_log10_p": round(float(np.median(np.log10(np.maximum(p, 1e-300)))), 1)}

    t_score = time.perf_counter()
    nll_m, ent_m = nll_and_entropy(model, [s.tokens for s in marked], P, L, args.score_batch)
    nll_p, ent_p = nll_and_entropy(model, [s.tokens for s in plain], P, L, args.score_batch)
    nll_g, ent_g = nll_and_entropy(model, [s.tokens for s in gumbel], P, L, args.score_batch)
    score_s = time.perf_counter() - t_score
    ppl_marked, ppl_plain, ppl_gumbel = (math.exp(x.mean()) for x in (nll_m, nll_p, nll_g))
    green_hits, gumbel_hits = z_marked > t200, p_marked <= FPR
    excess = {"plain": mean_ci(nll_p - ent_p, args.seed), "green_list": mean_ci(nll_m - ent_m, args.seed),
              "distortion_free": mean_ci(nll_g - ent_g, args.seed)}

    distortion_free = {
        "tpr_at_fpr_1e-3": float(gumbel_hits.mean()),
        "tpr_at_fpr_1e-3_ci95": rate_with_ci(gumbel_hits)["ci95"],
        "tpr_at_fpr_1e-3_retokenized": float((p_retok <= FPR).mean()),
        "tpr_at_empirical_fpr_1e-3": float((-np.log10(np.maximum(p_marked, 1e-300)) > t_human).mean()),
        "ppl_cost": round(ppl_gumbel / ppl_plain, 4),
        "ppl_cost_ci95": ppl_ratio_ci(nll_g, nll_p, args.seed),
        "ppl_watermarked": round(ppl_gumbel, 3), "ppl_plain": round(ppl_plain, 3),
        "plain_fpr": rate_with_ci(p_plain <= FPR),
        "human": {"n": int(len(p_human)), "fpr_at_1e-3": float((p_human <= FPR).mean()),
                  "share_below_0.01": float((p_human <= 0.01).mean()),
                  "share_below_0.05": float((p_human <= 0.05).mean()),
                  "ks_distance": round(ks_uniform(p_human), 4),
                  "ks_critical_1pct": round(1.628 / math.sqrt(len(p_human)), 4),
                  "empirical_threshold_log10_p": round(-t_human, 2)},
        "by_length": gum_length, "by_entropy": by_entropy_tpr(ent_g, gumbel_hits), "robustness": gum_robust,
        "tokens_scored_median": int(np.median([d.tokens_scored for d in g_marked])),
        "mean_score_median": round(float(np.median([d.mean_score for d in g_marked])), 3),
        "entropy_watermarked_mean": round(float(ent_g.mean()), 3),
        "settings": {"context_width": gcfg.context_width, "repeated_contexts": "drawn plainly, never scored",
                     "temperature": 1.0, "threshold": "exact p-value <= 1e-3 (Gamma(n, 1) tail)"},
    }
    result = {
        "tpr_at_fpr_1e-3": float(green_hits.mean()),
        "tpr_at_fpr_1e-3_ci95": rate_with_ci(green_hits)["ci95"],
        "tpr_at_fpr_1e-3_retokenized": float((z_retok > t200).mean()),
        "ppl_cost": round(ppl_marked / ppl_plain, 4),
        "ppl_cost_ci95": ppl_ratio_ci(nll_m, nll_p, args.seed),
        "threshold_z_at_fpr_1e-3": round(t200, 3),
        "plain_fpr_at_threshold": float((z_plain > t200).mean()),
        "ppl_watermarked": round(ppl_marked, 3), "ppl_plain": round(ppl_plain, 3),
        "by_length": by_length, "by_entropy": by_entropy_tpr(ent_m, green_hits), "robustness": robustness,
        "human_z": {"mean": round(float(human_z[L].mean()), 4), "std": round(float(human_z[L].std()), 4),
                    "max": round(float(human_z[L].max()), 3), "n": int(len(human_z[L]))},
        "entropy_plain_mean": round(float(ent_p.mean()), 3), "entropy_watermarked_mean": round(float(ent_m.mean()), 3),
        "distortion_free": distortion_free,
        "excess_nll": excess,
        "settings": {"gamma": args.gamma, "delta": args.delta, "context_width": wcfg.context_width,
                     "ignore_repeated": wcfg.ignore_repeated, "key_id": key_id(args.key), "temperature": 1.0,
                     "generations": len(marked), "new_tokens": args.new, "length": L, "prompt_tokens": P,
                     "human_passages": len(human), "human_sources": human_sources, "max_batch": args.max_batch,
                     "model": args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)", "device": args.device,
                     "threads": args.threads, "seed": args.seed},
        "seconds": {"generate": round(gen_s, 1), "score_ppl": round(score_s, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "note": "Green list (top level): TPR = share of watermarked generations whose z is above the threshold that "
                "at most 0.1% of human passages of the same length exceed. distortion_free: Gumbel-max sampling; "
                "TPR = share with exact p-value <= 1e-3 (human.fpr_at_1e-3 checks that rate on human text). "
                "ppl_cost: both sets scored by the unwatermarked model, 95% bootstrap interval over prompts; TPR "
                "intervals are Clopper-Pearson over generations. excess_nll: mean token NLL minus its context's "
                "entropy under the plain model (0 for an exact sample). Replacement: random vocabulary tokens at "
                "random positions (the same for both schemes; each also changes the next token's context). Not "
                "shown: paraphrase or edit robustness beyond substitution, key-recovery or spoofing attacks, other "
                "models or temperatures, sample diversity per prompt (the Gumbel watermark is deterministic given "
                "key and context).",
    }
    write_json(args.out, run_record("bench/watermark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    **result))
    print(f"green list: tpr_at_fpr_1e-3 {result['tpr_at_fpr_1e-3']:.3f} (threshold z {t200:.2f}), ppl_cost "
          f"{result['ppl_cost']} {result['ppl_cost_ci95']}, robustness "
          f"{({k: v['tpr'] for k, v in robustness.items()})}", file=sys.stderr)
    print(f"distortion-free: tpr_at_fpr_1e-3 {distortion_free['tpr_at_fpr_1e-3']:.3f}, ppl_cost "
          f"{distortion_free['ppl_cost']} {distortion_free['ppl_cost_ci95']}, human fpr "
          f"{distortion_free['human']['fpr_at_1e-3']}, robustness {({k: v['tpr'] for k, v in gum_robust.items()})}; "
          f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
