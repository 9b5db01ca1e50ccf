"""Every model family: parity with transformers on tiny specimens, and int8 decode speed at real shapes.

1. Parity (lilliput.eval.zoo.TINY: tiny random instances transformers builds from each family's
   config class, quirks switched on): logits max |diff| over 40 tokens, greedy 32 tokens through
   the engine equal to transformers' (torch path, and the fused C step where it runs), a batch
   equal to each prompt alone, GGUF F32 export and re-load, and llama.cpp's greedy tokens on that
   GGUF (16 tokens; where llama-cpp-python is installed: `python -m lilliput.eval.peers`).
2. Speed at real shapes (zoo.REAL: random weights in the config of Qwen3-0.6B, Gemma-3-270M,
   Llama-3.2-1B, Qwen2.5-0.5B and SmolLM3-3B with 12 of its 36 layers) beside the embedded SmolLM2:
   RTN int8, batch-1 decode tok/s (64-token prompt, 128 new tokens, runs interleaved) and its
   fraction of the memory-bandwidth limit (read bandwidth over a buffer >= 4x the last-level cache
   / the bytes of every matrix read per token).
The capability x family matrix is bench/matrix.py's (bench/results/matrix.json).

Writes bench/results/families.json with `families_matching`, `families_fast_path` and
`worst_int8_fraction_of_limit`. Random weights have no text: the speed runs use a word-level
tokenizer of each model's vocabulary size (token ids in, token ids out).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model
from lilliput.core.tokenizer import ByteTokenizer, Tokenizer
from lilliput.core.record import run_record, write_json
from lilliput.eval import zoo
from lilliput.eval.efficiency import interleave, linear_bytes, memory_bandwidth, decode_tok_s
from lilliput.infer import kernels
from lilliput.infer.fused import FusedStep
from lilliput.infer.generate import GenerationConfig, generate

OUT = Path(__file__).parent / "results" / "families.json"
SEQ = 40


def greedy(model, prompts: list[list[int]], fused: bool) -> list[list[int]]:
    saved = FusedStep.for_model
    if not fused:
        FusedStep.for_model = classmethod(lambda cls, m: None)
    try:
        cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
        return [g.tokens for g in generate(model, ByteTokenizer(), prompts, cfg)]
    finally:
        FusedStep.for_model = saved


@torch.no_grad()
def parity(name: str) -> dict:
    hf = zoo.hf_model(name)
    ours = zoo.to_lilliput(hf, "specimen")  # llama.cpp patches tokens by name in a model called "phi3"
    ids = zoo.prompt_ids(SEQ, batch=2)
    logits_diff = (hf(ids).logits.float() - ours(ids)).abs().max().item()
    prompts = [zoo.prompt_ids(n, seed=n)[0].tolist() for n in (5, 12, 20)]
    alone = [greedy(ours, [p], fused=False)[0] for p in prompts]
    row = {"family": ours.config.family, "logits_max_diff": logits_diff,
           "greedy_equal": all(a == zoo.hf_greedy(hf, p, 32) for p, a in zip(prompts, alone)),
           "batch_equals_alone": greedy(ours, prompts, fused=False) == alone}
    step = FusedStep.for_model(ours)
    row["fast_path"] = step is not None
    if step is not None:
        row["fused_greedy_equal"] = greedy(ours, prompts, fused=True) == alone
    with tempfile.TemporaryDirectory() as tmp:
        try:
            from lilliput.export.gguf import export_gguf

            path = export_gguf(ours, zoo.byte_bpe(), Path(tmp) / "m.gguf", "F32", check=False)
            back, _ = load_model(str(path), device="cpu")
            row["gguf_max_diff"] = (back(ids) - ours(ids)).abs().max().item()
            # 40-token prompt: past Phi-3's original context (32), where every runtime uses the long factors
            long_prompt = zoo.prompt_ids(SEQ, seed=SEQ)[0].tolist()
            row["llama_cpp_greedy_equal"] = llama_cpp_greedy(path, long_prompt, greedy(ours, [long_prompt], False)[0][:16])
        except (ValueError, NotImplementedError) as e:
            row["gguf_max_diff"], row["gguf_refused"] = None, str(e).splitlines()[0]
    row["matches"] = bool(logits_diff <= 1e-4 and row["greedy_equal"] and row["batch_equals_alone"]
                          and row["gguf_max_diff"] is not None and row["gguf_max_diff"] <= 1e-4
                          and row.get("llama_cpp_greedy_equal") is not False)
    return row


def llama_cpp_greedy(path: Path, prompt: list[int], ours: list[int]) -> bool | None:
    """Whether llama.cpp's greedy tokens on the GGUF equal `ours` (None where llama-cpp-python is absent:
    `python -m lilliput.eval.peers` builds it)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from lilliput.export.runtimes import LlamaCppModel

    runner = LlamaCppModel(path, threads=1, n_ctx=64)
    tokens = list(prompt)
    for _ in ours:
        tokens.append(int(runner.logits(tokens)[-1].argmax()))
    return tokens[len(prompt):] == ours


def id_tokenizer(vocab: int) -> Tokenizer:
    """A word-level tokenizer over `vocab` placeholder tokens: random-weight models have no text."""
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
    return Tokenizer(backend)


def real_model(name: str):
    """A random-weight lilliput model at a real family's shapes, RTN int8 (the float copy freed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = zoo.hf_model(name, table=zoo.REAL, std=0.02)
    model = zoo.to_lilliput(hf, name)
    del hf
    gc.collect()
    model.float_params = model.num_params()  # before quantization (int8 codes are buffers)
    quantize_(model, RTNConfig(bits=8))
    return model


def speeds(names: list[str], repeats: int, new_tokens: int) -> dict:
    bw = memory_bandwidth()
    models = {"smollm2-135m": load_model(None, device="cpu")[0]}
    models["smollm2-135m"].float_params = models["smollm2-135m"].num_params()
    quantize_(models["smollm2-135m"], RTNConfig(bits=8))
    for name in names:
        t = time.perf_counter()
        models[name] = real_model(name)
        print(f"built {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    prompt = list(range(3, 67))
    pairs = {n: (m, id_tokenizer(m.config.vocab_size)) for n, m in models.items()}
    got = interleave({n: (lambda m=m, t=t: decode_tok_s(m, t, prompt, new_tokens)) for n, (m, t) in pairs.items()},
                     repeats, warmup=1)
    rows = {}
    for n, m in models.items():
        per_token = linear_bytes(m)
        limit = bw["read_bandwidth_gb_s"] * 1e9 / per_token
        rows[n] = {"family": m.config.family, "params": m.float_params,
                   "int8_bytes_per_token": per_token, "fast_path": FusedStep.for_model(m) is not None,
                   "int8_decode_tok_s": got[n], "limit_tok_s": round(limit, 1),
                   "int8_fraction_of_limit": round(got[n]["median"] / limit, 3)}
    return {"bandwidth": bw, "models": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the speed runs")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--real", default=",".join(zoo.REAL), help="real-shape models to time (comma-separated)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: every core)")
    args = ap.parse_args(argv)
    if args.threads:
        kernels.set_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    rows = {}
    for name in zoo.TINY:
        rows[name] = parity(name)
        print(f"{name}: {rows[name]}", file=sys.stderr)
    by_family: dict[str, list[dict]] = {}
    for r in rows.values():
        by_family.setdefault(r["family"], []).append(r)
    real = speeds([n for n in args.real.split(",") if n], args.repeats, args.new_tokens)
    families_fast = sorted(f for f, rs in by_family.items() if all(r["fast_path"] for r in rs))
    real_fractions = {n: r["int8_fraction_of_limit"] for n, r in real["models"].items() if n != "smollm2-135m"}
    result = {
        "families": sorted(by_family),
        "families_matching": sum(all(r["matches"] for r in rs) for rs in by_family.values()),
        "families_fast_path": len(families_fast),
        "fast_path_families": families_fast,
        "worst_int8_fraction_of_limit": min(real_fractions.values()) if real_fractions else None,
        "smollm2_int8_fraction_of_limit": real["models"]["smollm2-135m"]["int8_fraction_of_limit"],
        "kernels": kernels.describe(),
        "specimens": rows,
        "real_shapes": real,
        "wall_s": round(time.perf_counter() - t0, 1),
        "notes": "Parity: tiny random specimens (4 layers, width 64) against transformers' own classes. Speed: "
                 "random weights at real shapes, RTN int8 at batch 1; the limit divides the read bandwidth over a "
                 "buffer >= 4x the last-level cache by the bytes of every matrix read per token (the KV cache and "
                 "embedding row ignored). Random weights say nothing of quality.",
    }
    write_json(args.out, run_record("bench/families.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    **result))
    print(f"families_matching {result['families_matching']}/{len(by_family)}, families_fast_path "
          f"{result['families_fast_path']}, worst_int8_fraction_of_limit {result['worst_int8_fraction_of_limit']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
