"""Speculative decoding on SmolLM2-135M at batch 1: each drafter and k against the target alone.

Prompts of two kinds: open-ended chat (nothing to copy) and input-grounded (summarise, extract,
rewrite a given passage; edit given code), where the answer repeats the input. Drafters: prompt
lookup (no model) and a draft model (the target quantized to int4, RTN g64: same tokenizer, ~1/3
of the bytes). For each drafter, k in --ks with k fixed, and the adaptive controller. Greedy
decoding, so every setting must give the target's own tokens (checked and recorded). Each prompt
runs every setting back to back (interleaved); tokens/s is new tokens over the time after the
prefill (a draft model reads the prompt in the prefill, before the first token: `ttft_ratio` is each
setting's time to first token over the target's alone); each prompt runs --repeats rounds and keeps
its median. Both targets (fp32 and int8)
are measured whole in one run. Writes bench/results/speculative.json with `best_speedup` (target
>= 1.5), `worst_slowdown` (the adaptive controller's worst kind; target >= 0.95) and
`worst_prompt_adaptive` (its slowest single prompt over both targets; target >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model
from lilliput.core.record import run_record, write_json
from lilliput.eval.tasks import lambada_passages
from lilliput.infer import kernels
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.infer.speculative import DraftModel, PromptLookup, SpeculationConfig, SpeculativeDecoder

OUT = Path(__file__).parent / "results" / "speculative.json"
CHAT = ["Write a short story about a robot who learns to paint.", "What are the benefits of regular exercise?",
        "Explain how rainbows form.", "Give three pieces of advice to a new university student.",
        "Describe a perfect weekend in the mountains."]
CODE = '''def total_price(items, tax):
    x = 0
    for item in items:
        x = x + item.price * item.quantity
    x = x * (1 + tax)
    return x
'''


def grounded(passages: list[str]) -> list[str]:
    p = passages
    return [f"Summarise this text in two sentences.\n\nText: {p[0]}",
            f"List every person named in this text, one per line.\n\nText: {p[1]}",
            f"Rewrite this text in simpler words, keeping every sentence.\n\nText: {p[2]}",
            f"Rename the variable x to subtotal in this code and return the whole code.\n\n{CODE}",
            f"Copy the following text exactly, then say how many sentences it has.\n\nText: {p[3]}"]


def measure(model, draft_model, tok, kinds: dict, ks: list[int], new: int, repeats: int) -> dict:
    """Every setting on every prompt against `model` alone, `repeats` interleaved rounds per prompt:
    the table per setting and kind, the per-prompt speedups and whether every setting gave the
    target's own tokens."""
    cfg = GenerationConfig(max_new_tokens=new, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(max_batch=1, max_len=1024))
    drafters = {"lookup": PromptLookup(), "draft-int4": DraftModel(draft_model, engine)}
    settings = ["plain"] + [f"{d} k={k}" for d in drafters for k in ks] + [f"{d} adaptive" for d in drafters]

    def run_one(setting: str, prompt: str):
        if setting == "plain":
            seq = engine.add(prompt, cfg, bos=False)
            engine.run()
            return seq, None
        name, mode = setting.split(" ")
        scfg = SpeculationConfig(k=4, adaptive=True) if mode == "adaptive" else \
            SpeculationConfig(k=int(mode[2:]), k_max=max(8, int(mode[2:])), adaptive=False)
        dec = SpeculativeDecoder(engine, drafters[name], scfg)
        return dec.generate(prompt, cfg, bos=False), dec.stats

    rows = {s: {k: [] for k in kinds} for s in settings}  # tok/s per prompt (median of the rounds)
    per_prompt = {s: {k: [] for k in kinds} for s in settings}  # speedup per prompt (median of the rounds)
    ttft = {s: {k: [] for k in kinds} for s in settings}  # time to first token / plain's, per prompt (median)
    stats = {s: {k: [] for k in kinds} for s in settings}
    identical = {s: True for s in settings}
    for kind, prompts in kinds.items():
        for i, text in enumerate(prompts):
            prompt = tok.apply_chat_template([{"role": "user", "content": text}])
            run_one("plain", prompt)  # warm-up (and the prefix cache is off the table: max_batch 1 keeps it)
            tps, first, ref = {s: [] for s in settings}, {s: [] for s in settings}, None
            for _ in range(repeats):
                for s in settings:
                    seq, st = run_one(s, prompt)
                    tps[s].append((len(seq.output) - 1) / (seq.finished_at - seq.first_token_at))
                    first[s].append(seq.first_token_at - seq.arrival)
                    if st:
                        stats[s][kind].append(st.as_dict())
                    ref = ref if ref is not None else seq.output
                    identical[s] &= seq.output == ref
            for s in settings:
                rows[s][kind].append(statistics.median(tps[s]))
                per_prompt[s][kind].append(statistics.median(a / b for a, b in zip(tps[s], tps["plain"])))
                ttft[s][kind].append(statistics.median(a / b for a, b in zip(first[s], first["plain"])))
            print(f"{kind} {i + 1}/{len(prompts)}: " + ", ".join(
                f"{s} {per_prompt[s][kind][-1]:.2f}x" for s in settings[1:]), file=sys.stderr)

    def mean(xs):
        return statistics.fmean(xs) if xs else None

    table = {}
    for s in settings:
        table[s] = {}
        for kind in kinds:
            speed, st = per_prompt[s][kind], stats[s][kind]
            table[s][kind] = {"tok_s": round(mean(rows[s][kind]), 2), "speedup": round(mean(speed), 3),
                              "speedup_range": [round(min(speed), 3), round(max(speed), 3)],
                              "speedup_per_prompt": [round(x, 3) for x in speed],
                              "ttft_ratio": round(mean(ttft[s][kind]), 3),
                              **({"acceptance_rate": round(mean([x["acceptance_rate"] for x in st]), 3),
                                  "mean_accepted_length": round(mean([x["mean_accepted_length"] for x in st]), 3),
                                  "plain_steps": sum(x["plain_steps"] for x in st)} if st else {})}
    spec = [s for s in settings if s != "plain"]
    best = max(((s, k) for s in spec for k in kinds), key=lambda sk: table[sk[0]][sk[1]]["speedup"])
    adaptive = [(s, k) for s in spec if s.endswith("adaptive") for k in kinds]
    worst = min(adaptive, key=lambda sk: table[sk[0]][sk[1]]["speedup"])
    worst_prompt = min(((s, k, i) for s, k in adaptive for i in range(len(per_prompt[s][k]))),
                       key=lambda ski: per_prompt[ski[0]][ski[1]][ski[2]])
    return {"best_speedup": table[best[0]][best[1]]["speedup"], "best_setting": f"{best[0]} on {best[1]} prompts",
            "worst_slowdown": table[worst[0]][worst[1]]["speedup"], "worst_setting": f"{worst[0]} on {worst[1]} prompts",
            "worst_prompt_adaptive": round(per_prompt[worst_prompt[0]][worst_prompt[1]][worst_prompt[2]], 3),
            "worst_prompt_setting": f"{worst_prompt[0]} on {worst_prompt[1]} prompt {worst_prompt[2] + 1}",
            "identical_to_target": identical, "settings": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ks", default="2,4,6,8")
    ap.add_argument("--prompts", type=int, default=5, help="prompts per kind")
    ap.add_argument("--targets", default="fp32,int8", help="targets, each measured whole: fp32, int8")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per prompt (per-prompt medians)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    targets = args.targets.split(",")
    if not set(targets) <= {"fp32", "int8"}:
        ap.error(f"--targets: fp32 and/or int8, got {args.targets}")

    model, tok = load_model(None, device="cpu")
    draft_model = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=64))
    passages = [p for p in lambada_passages(40) if 400 < len(p) < 900][:4]
    kinds = {"chat": CHAT[:args.prompts], "grounded": grounded(passages)[:args.prompts]}
    by_target = {}
    for target in targets:
        print(f"target {target}", file=sys.stderr)
        m = quantize_(copy.deepcopy(model), RTNConfig(bits=8)) if target == "int8" else model
        by_target[target] = measure(m, draft_model, tok, kinds, ks, args.new, args.repeats)
    first = by_target[targets[0]]
    worst_target = min(by_target, key=lambda t: by_target[t]["worst_prompt_adaptive"])
    result = {
        "threads": args.threads, "new_tokens": args.new, "targets": targets, "ks": ks, "repeats": args.repeats,
        "draft_model": "the fp32 model quantized to int4 (RTN, group 64)",
        **{k: first[k] for k in ("best_speedup", "best_setting", "worst_slowdown", "worst_setting")},
        "headline_target": targets[0],
        "worst_prompt_adaptive": by_target[worst_target]["worst_prompt_adaptive"],
        "worst_prompt_setting": f"{worst_target} target: {by_target[worst_target]['worst_prompt_setting']}",
        "by_target": by_target, "kernels": kernels.describe(),
        "prompts": {k: v for k, v in kinds.items()},
        "note": "batch 1, greedy; speedup = tokens/s after the first token / the target alone on the same prompt "
                "in the same round, the median of the rounds per prompt, averaged over prompts per kind; "
                "worst_prompt_adaptive: the slowest single prompt under either adaptive controller, over every "
                "target (target >= 0.95). adaptive = k chosen from the running acceptance rate and measured "
                "costs, plain decoding when no k pays. best_/worst_slowdown fields are the headline target's. A draft "
                "model reads the prompt before the first token (the prefill of both models): its cost is in "
                "ttft_ratio (time to first token / the target's alone), not in the speedups.",
    }
    write_json(args.out, run_record("bench/speculative.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    **result))
    print(f"best_speedup {result['best_speedup']} ({result['best_setting']}), worst_slowdown "
          f"{result['worst_slowdown']} ({result['worst_setting']}), worst_prompt_adaptive "
          f"{result['worst_prompt_adaptive']} ({result['worst_prompt_setting']}); wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
