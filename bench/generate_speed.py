"""Decode speed of lilliput vs transformers `generate` on the same SmolLM2-135M weights, in one run.

128 new tokens, greedy, batch 1, after a 64-token prompt; median of 5 (runs interleaved so drift
hits both alike). Also records the memory-bandwidth limit: bytes read per token / measured read
bandwidth. Timing and byte counts come from `lilliput.eval.efficiency`. Writes
bench/results/generate_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lilliput.core.checkpoint import load_model, to_transformers
from lilliput.core.record import machine, run_record, write_json
from lilliput.data.corpus import sample_documents
from lilliput.eval.efficiency import interleave, linear_bytes, read_bandwidth_gb_s
from lilliput.infer.generate import GenerationConfig, generate

OUT = Path(__file__).parent / "results" / "generate_speed.json"


def bytes_per_token(model, prompt_len: int, new: int) -> int:
    """Weights read once per decoded token (embedding row ignored, output layer counted) + mean KV read."""
    c, elt = model.config, next(model.parameters()).element_size()
    kv_per_pos = 2 * c.n_layers * c.n_kv_heads * c.hd * elt
    return linear_bytes(model) + kv_per_pos * (prompt_len + new // 2)


def tok_s(fn, new: int):
    """A timing run for `interleave`: new tokens / wall seconds of one call of fn (prefill included)."""
    def run() -> float:
        t = time.perf_counter()
        fn()
        return new / (time.perf_counter() - t)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    model, tok = load_model(None, device="cpu")
    load_s = model.load_seconds
    doc = next(d for d in sample_documents() if "pride" in d.id.lower())
    prompt = tok.encode(doc.text)[:args.prompt_len]
    cfg = GenerationConfig(max_new_tokens=args.new, ignore_eos=True)
    result = {"prompt_tokens": len(prompt), "new_tokens": args.new, "repeats": args.repeats,
              "gguf_load_seconds": round(load_s, 2)}
    tokens = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = model.to(dtype)
        hf = to_transformers(ours)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = tok.eos_id
        ids = torch.tensor([prompt])

        def run_ours():
            return generate(ours, tok, [prompt], cfg)[0]

        def run_hf():
            with torch.inference_mode():
                return hf.generate(ids, max_new_tokens=args.new, do_sample=False, attention_mask=torch.ones_like(ids))

        tokens[f"lilliput_{name}"] = run_ours().tokens  # warm-up, and the tokens to compare
        tokens[f"transformers_{name}"] = run_hf()[0, len(prompt):].tolist()
        rates = interleave({"lilliput": tok_s(run_ours, args.new), "transformers": tok_s(run_hf, args.new)},
                           args.repeats, warmup=0)  # the runs above warmed both up
        for who, s in rates.items():
            result[f"{who}_{name}_tok_s"] = round(s["median"], 2)
            result[f"{who}_{name}_tok_s_range"] = [round(s["min"], 2), round(s["max"], 2)]
        result[f"ratio_{name}"] = round(result[f"lilliput_{name}_tok_s"] / result[f"transformers_{name}_tok_s"], 3)
        result[f"bytes_per_token_{name}"] = bytes_per_token(ours, len(prompt), args.new)
        print(f"{name}: lilliput {result[f'lilliput_{name}_tok_s']} tok/s, transformers "
              f"{result[f'transformers_{name}_tok_s']} tok/s, ratio {result[f'ratio_{name}']}", file=sys.stderr)
    model = model.float()
    same = tokens["lilliput_fp32"] == tokens["transformers_fp32"]
    result["greedy_tokens_identical"] = same
    result["greedy_tokens_identical_bf16"] = tokens["lilliput_bf16"] == tokens["transformers_bf16"]
    if not same:
        result["first_divergence_fp32"] = next(i for i, (a, b) in enumerate(
            zip(tokens["lilliput_fp32"], tokens["transformers_fp32"])) if a != b)
    bw = read_bandwidth_gb_s()
    result["read_bandwidth_gb_s"] = round(bw, 2)
    for name in ("fp32", "bf16"):
        result[f"limit_{name}_tok_s"] = round(bw * 1e9 / result[f"bytes_per_token_{name}"], 1)
        result[f"fraction_of_limit_{name}"] = round(result[f"lilliput_{name}_tok_s"] / result[f"limit_{name}_tok_s"], 3)
    result["sample_text"] = tok.decode(tokens["lilliput_fp32"][:40])
    record = run_record("bench/generate_speed.py " + " ".join(argv or sys.argv[1:]), machine=machine(), **result)
    write_json(args.out, record)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
