"""The Kirchenbauer et al. (2023) watermark on SmolLM2: detection power, cost and robustness.

SmolLM2-135M-Instruct continues varied prompts (openings of LAMBADA passages and of corpus
documents, `--prompt-tokens` each) at temperature 1.0, once with the watermark (gamma, delta)
and once without, same seeds, through the engine (`--max-batch` rows at a time). Human text:
`--human` passages of the same lengths cut from the default corpus (the fetched one, else the
shipped sample) and LAMBADA, tokenized by the same tokenizer; each is scored from its second
token on, as a generation is scored from its first (the token before gives the context).

Written to bench/results/watermark.json:

- `tpr_at_fpr_1e-3`: share of 200-token watermarked generations whose z exceeds the threshold
  that at most 0.1% of human passages exceed (the empirical false-positive rate <= 1e-3);
  `_retokenized`: the same after decoding the generation to text and tokenizing it again;
- `by_length`: that TPR, its threshold and the TPR at the fixed z = 4, for 25 .. 400 tokens;
- `by_entropy`: TPR at 200 tokens within quartiles of the generations' mean next-token entropy
  under the plain model (low-entropy text leaves the watermark little room);
- `ppl_cost`: perplexity of the watermarked generations / of the plain ones, both under the
  plain (unwatermarked) model, over their first 200 tokens;
- `robustness`: TPR at 200 tokens after replacing 10% / 30% of the tokens by random ones;
- `human_z`: mean and standard deviation of z on human text (should be ~0 and ~1).

    .venv/bin/python bench/watermark.py                      # the full run
    .venv/bin/python bench/watermark.py --generations 4 --human 20 --new 60 --lengths 25,50   # smoke
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
from lilliput.data.watermark import Detector, Watermark, WatermarkConfig, key_id
from lilliput.eval.task_sets import lambada_passages
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.train.data import default_documents

OUT = Path(__file__).parent / "results" / "watermark.json"
FPR = 1e-3


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=256, help="prompts (each generated with and without)")
    ap.add_argument("--human", type=int, default=1000, help="human passages")
    ap.add_argument("--new", type=int, default=400, help="tokens generated per prompt (>= the longest length)")
    ap.add_argument("--length", type=int, default=200, help="tokens scored for the headline TPR and ppl_cost")
    ap.add_argument("--lengths", default="25,50,100,200,400", help="lengths of the TPR-vs-length curve")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gamma", type=float, default=WatermarkConfig.gamma)
    ap.add_argument("--delta", type=float, default=WatermarkConfig.delta)
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

    # human text: one window of max(lengths) + 1 tokens each, scored from its second token
    human, human_sources = human_windows(tok, args.human, max(lengths) + 1, skip_lambada=args.generations)
    if len(human) < args.human:
        print(f"only {len(human)} human windows of {max(lengths) + 1} tokens available", file=sys.stderr)
    human_z = {L: np.array([det.detect(w[:L + 1], prompt_len=1).z for w in human]) for L in lengths}

    # generations: watermarked and plain, same prompts and seeds
    prompts = prompts_for(tok, args.generations, args.prompt_tokens)
    engine = Engine(model, tok, EngineConfig(max_batch=args.max_batch, max_len=args.prompt_tokens + args.new))
    marked, plain = [], []
    for i, p in enumerate(prompts):
        cfg = GenerationConfig(max_new_tokens=args.new, temperature=1.0, seed=args.seed + i, ignore_eos=True)
        marked.append(engine.add(p, cfg, processors=[wm]))
        plain.append(engine.add(p, cfg))
    t_gen = time.perf_counter()
    engine.run()
    gen_s = time.perf_counter() - t_gen
    print(f"generated {2 * len(prompts)} x {args.new} tokens in {gen_s:.0f}s", file=sys.stderr)
    P = args.prompt_tokens

    by_length = {}
    for L in lengths:
        z = np.array([det.detect(s.tokens[:P + L], prompt_len=P).z for s in marked])
        t = threshold_at(human_z[L], FPR)
        by_length[str(L)] = {"tpr": float((z > t).mean()), "threshold_z": round(t, 3),
                             "tpr_at_z4": float((z >= 4).mean()), "human_fpr_at_z4": float((human_z[L] >= 4).mean()),
                             "median_z": round(float(np.median(z)), 2)}
    L = args.length
    t200 = threshold_at(human_z[L], FPR)
    z_marked = np.array([det.detect(s.tokens[:P + L], prompt_len=P).z for s in marked])
    z_plain = np.array([det.detect(s.tokens[:P + L], prompt_len=P).z for s in plain])
    z_retok = np.array([det.detect_text(tok.decode(s.output[:L]), tok).z for s in marked])

    rng = random.Random(args.seed)
    robustness = {}
    for rate in (0.1, 0.3):
        z = np.array([det.detect(s.tokens[:P] + replace_tokens(s.output[:L], rate, tok.vocab_size, rng),
                                 prompt_len=P).z for s in marked])
        robustness[f"replace_{rate}"] = {"tpr": float((z > t200).mean()), "median_z": round(float(np.median(z)), 2)}

    t_score = time.perf_counter()
    nll_m, ent_m = nll_and_entropy(model, [s.tokens for s in marked], P, L, args.score_batch)
    nll_p, ent_p = nll_and_entropy(model, [s.tokens for s in plain], P, L, args.score_batch)
    score_s = time.perf_counter() - t_score
    ppl_marked, ppl_plain = math.exp(nll_m.mean()), math.exp(nll_p.mean())
    edges = np.quantile(ent_m, [0.0, 0.25, 0.5, 0.75, 1.0])
    by_entropy = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (ent_m >= lo) & (ent_m <= hi)
        by_entropy.append({"entropy_nats": [round(float(lo), 3), round(float(hi), 3)], "n": int(inside.sum()),
                           "tpr": float((z_marked[inside] > t200).mean()) if inside.any() else None})

    result = {
        "tpr_at_fpr_1e-3": float((z_marked > t200).mean()),
        "tpr_at_fpr_1e-3_retokenized": float((z_retok > t200).mean()),
        "ppl_cost": round(ppl_marked / ppl_plain, 4),
        "threshold_z_at_fpr_1e-3": round(t200, 3),
        "plain_fpr_at_threshold": float((z_plain > t200).mean()),
        "ppl_watermarked": round(ppl_marked, 3), "ppl_plain": round(ppl_plain, 3),
        "by_length": by_length, "by_entropy": by_entropy, "robustness": robustness,
        "human_z": {"mean": round(float(human_z[L].mean()), 4), "std": round(float(human_z[L].std()), 4),
                    "max": round(float(human_z[L].max()), 3), "n": int(len(human_z[L]))},
        "entropy_plain_mean": round(float(ent_p.mean()), 3), "entropy_watermarked_mean": round(float(ent_m.mean()), 3),
        "settings": {"gamma": args.gamma, "delta": args.delta, "context_width": wcfg.context_width,
                     "ignore_repeated": wcfg.ignore_repeated, "key_id": key_id(args.key), "temperature": 1.0,
                     "generations": len(marked), "new_tokens": args.new, "length": L, "prompt_tokens": P,
                     "human_passages": len(human), "human_sources": human_sources, "max_batch": args.max_batch,
                     "model": args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)", "device": args.device,
                     "threads": args.threads, "seed": args.seed},
        "seconds": {"generate": round(gen_s, 1), "score_ppl": round(score_s, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "note": "TPR = share of watermarked generations whose z is above the threshold that at most 0.1% of human "
                "passages of the same length exceed. ppl_cost: both sets scored by the unwatermarked model. "
                "Replacement: random vocabulary tokens at random positions (each also changes the next token's "
                "green list).",
    }
    write_json(args.out, run_record("bench/watermark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    **result))
    print(f"tpr_at_fpr_1e-3 {result['tpr_at_fpr_1e-3']:.3f} (threshold z {t200:.2f}), ppl_cost "
          f"{result['ppl_cost']}, human z {result['human_z']['mean']:+.2f} +- {result['human_z']['std']:.2f}, "
          f"robustness {({k: v['tpr'] for k, v in robustness.items()})}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
