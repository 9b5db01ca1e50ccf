"""Every measured table in README.md, docs/*.md and bench/README.md, generated from bench/results/*.json.

A table lives in its page between two markers, rewritten whole by this script:

    <!-- bench:engine begin (bench/readme.py) -->
    ...
    <!-- bench:engine end -->

`engine` names a function of TABLES (one per results file, or a part of one); the capability x family
matrix keeps bench/matrix.py's own markers and format. bench/README.md is generated whole: every results
file with its command, date, machine and headline figures. `--check` rewrites nothing and exits 1 when a
page and the JSON disagree (tests/test_readme.py runs it).

    python bench/readme.py           # rewrite the pages
    python bench/readme.py --check   # do they agree with bench/results?
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGES = ("README.md", "docs/shrink.md", "docs/build.md", "docs/data.md", "docs/run.md")
BENCH_README = "bench/README.md"
MATRIX_BEGIN, MATRIX_END = "<!-- matrix:begin (bench/matrix.py --readme) -->", "<!-- matrix:end -->"
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) begin \(bench/readme\.py\) -->\n.*?<!-- bench:(?P=name) end -->", re.S)

from readme_format import TABLES, fmt, load, mb, md, source, table  # noqa: F401  (TABLES: the registry)
import readme_data  # noqa: F401,E402  (registers the data pillar's tables)


# --- one function per table ---------------------------------------------------------------------

@table("engine")
def _engine(results: Path) -> str | None:
    r = load(results, "engine")
    if r is None:
        return None
    parts = [f(r) for key, f in (("decode_tok_s", _engine_smollm2), ("arch_decode_tok_s", _engine_archs)) if key in r]
    return "\n\n".join(parts + [source(r, "engine")])


def _engine_smollm2(r: dict) -> str:
    d = r["decode_tok_s"]
    batches = sorted({int(k.rsplit("b", 1)[1]) for k in d}, key=int)
    rows = []
    for b in batches:
        get = lambda k: (d.get(f"{k} b{b}") or {}).get("median")  # noqa: E731
        hf, i8 = get("transformers fp32"), get("lilliput int8")
        rows.append([str(b), get("lilliput fp32"), i8, get("lilliput int4"), hf,
                     f"{i8 / hf:.1f}x" if i8 and hf else "-"])
    s = r["serving"]
    cont, seq = s["int8 continuous (16 rows)"], s["int8 one at a time"]
    return (f"Decode-only tok/s, all rows together ({r['new_tokens']} new tokens after {r['prompt_tokens']}-token "
            f"prompts, {r['threads']} threads, median of {r['repeats']} interleaved rounds):\n\n"
            + md(["batch", "lilliput fp32", "int8", "int4", "transformers fp32", "int8 / transformers"], rows)
            + "\n\n" + md(["figure", "value"], [
                ["int8 decode-only, batch 8 / batch 1 (`int8_batch8_vs_batch1`)", f"**{fmt(r['int8_batch8_vs_batch1'])}**"],
                ["requests/s, continuous batching (16 rows) / one at a time (`continuous_vs_sequential`)",
                 f"**{fmt(r['continuous_vs_sequential'])}** ({fmt(cont['requests_per_s'])} vs {fmt(seq['requests_per_s'])})"],
                ["time to first token p50, continuous / one at a time",
                 f"{fmt(cont['ttft_p50_s'])} s / {fmt(seq['ttft_p50_s'])} s"],
                ["int8 batch 1 / read-bandwidth limit (`int8_fraction_of_limit`)",
                 f"**{fmt(r['int8_fraction_of_limit'])}** (limit {fmt(r['limit_tok_s']['int8'])} tok/s at "
                 f"{fmt(r['read_bandwidth_gb_s'])} GB/s)"],
                ["fp32 batch 1 / limit", fmt(r.get("fp32_fraction_of_limit"))]]))


def _engine_archs(r: dict) -> str:
    d, setup = r["arch_decode_tok_s"], r["arch_setup"]
    contexts = [str(c) for c in setup["contexts"]]
    rows = [[f"{arch} b{b[1:]}", *(v[c] for c in contexts)] for arch, by_batch in d.items() for b, v in by_batch.items()]
    return (f"The arena's architectures (`*-arena` presets, random init), decode-only tok/s through the engine at each "
            f"context, {setup['new_tokens']} new tokens, median of {r['repeats']} interleaved rounds; Mamba / dense "
            f"at batch 1, least over contexts (`mamba_vs_dense_batch1_min`): "
            f"**{fmt(r.get('mamba_vs_dense_batch1_min'))}**:\n\n"
            + md(["architecture, batch", *(f"context {c}" for c in contexts)], rows))


@table("generate_speed")
def _generate_speed(results: Path) -> str | None:
    r = load(results, "generate_speed")
    if r is None:
        return None
    rows = [[dt, r[f"lilliput_{dt}_tok_s"], r[f"transformers_{dt}_tok_s"], f"**{fmt(r[f'ratio_{dt}'])}x**",
             r.get(f"fraction_of_limit_{dt}")] for dt in ("fp32", "bf16") if f"ratio_{dt}" in r]
    return (f"End-to-end tok/s (prefill included), batch 1, greedy, {r['new_tokens']} new tokens after a "
            f"{r['prompt_tokens']}-token prompt, median of {r['repeats']} interleaved runs:\n\n"
            + md(["weights", "lilliput", "transformers generate", "ratio", "fraction of the bandwidth limit"], rows)
            + f"\n\nGreedy tokens identical to transformers' (fp32): {fmt(r.get('greedy_tokens_identical'))}; "
              f"loading the 135M GGUF: {fmt(r.get('gguf_load_seconds'))} s.\n\n" + source(r, "generate_speed"))


@table("vs_llamacpp")
def _vs_llamacpp(results: Path) -> str | None:
    r = load(results, "vs_llamacpp")
    if r is None:
        return None
    rows = [[f"{x['engine']} {x['model']}", x["decode_tok_s"], x.get("prompt_tok_s"), x.get("fraction_of_limit")]
            for x in r["rows"]]
    return (f"Batch 1, greedy, {r['threads']} threads, {r['new_tokens']} new tokens; prompt speed over "
            f"{r['pp_tokens']} tokens:\n\n"
            + md(["engine, weights", "decode-only tok/s", "prompt tok/s", "fraction of the bandwidth limit"], rows)
            + f"\n\nint8 / Q8_0 **{fmt(r['int8_vs_q8_0'])}x**, int4 / Q4_0 **{fmt(r['int4_vs_q4_0'])}x**, "
              f"int4 / Q4_1 {fmt(r['int4_vs_q4_1'])}x, prompt int8 / Q8_0 {fmt(r['prompt_int8_vs_q8_0'])}x.\n\n"
            + source(r, "vs_llamacpp"))


@table("eval_smollm2")
def _eval(results: Path) -> str | None:
    r = load(results, "eval_smollm2")
    if r is None:
        return None
    rows = [[f"{k} ({v['metric']})", v["lilliput"], v["published"], f"{v['published_for']} card"]
            for k, v in r["comparison"].items()]
    ppl = r.get("lambada_perplexity") or {}
    return (f"Zero-shot, first {r['limit']} items of each set, lm-evaluation-harness prompts:\n\n"
            + md(["task (metric)", "lilliput", "published", "published for"], rows)
            + f"\n\nHeld-out perplexity on LAMBADA: {fmt(ppl.get('perplexity'))} ({fmt(ppl.get('tokens'))} tokens).\n\n"
            + source(r, "eval_smollm2"))


@table("quantize")
def _quantize(results: Path) -> str | None:
    r = load(results, "quantize")
    if r is None:
        return None
    rows = [[k, x.get("ppl"), x.get("ppl_ratio"), mb(x.get("bytes")), x.get("tok_s"), x.get("speedup_vs_fp32")]
            for k, x in r["smollm2"]["rows"].items()]
    best = r["int4_g128_best"]
    return ("SmolLM2-135M (its weights are Q4_1 already, so int4 is also measured on a float model lilliput "
            "trained):\n\n" + md(["weights", "perplexity", "x fp32", "weights in memory", "decode-only tok/s",
                                  "speed x fp32"], rows)
            + f"\n\nint8: perplexity x{fmt(r['int8']['ppl_ratio'], 4)}, decode **{fmt(r['int8']['speedup_vs_fp32'])}x** "
              f"fp32. int4 g128 on the float model: best {best['method']} x{fmt(best['ppl_ratio'], 4)} "
              f"(RTN x{fmt(best['rtn_ppl_ratio'], 4)}).\n\n" + source(r, "quantize"))


@table("prune")
def _prune(results: Path) -> str | None:
    r = load(results, "prune")
    if r is None:
        return None
    rows = [[pattern, *(f"x{fmt(v[m]['ppl_ratio'])}" for m in ("magnitude", "wanda", "sparsegpt"))]
            for pattern, v in r["unstructured"].items()]
    s = r["structured_healed"]
    return (f"Perplexity ratio to the dense model ({r['perplexity_text']}; dense {fmt(r['dense_ppl'])}):\n\n"
            + md(["sparsity", "magnitude", "Wanda", "SparseGPT"], rows)
            + f"\n\nStructured ({s['shape']}), least-squares refit, healed {fmt(s['healing']['minutes'])} min "
              f"({fmt(s['healing']['tokens'])} tokens): perplexity x{fmt(s['ppl_ratio'])} (unhealed "
              f"x{fmt(s['ppl_ratio_unhealed'])}), decode-only **{fmt(s['speedup'])}x** "
              f"({fmt(s['decode_tok_s']['pruned'])} vs {fmt(s['decode_tok_s']['dense'])} tok/s).\n\n"
            + source(r, "prune"))


@table("distill")
def _distill(results: Path) -> str | None:
    r = load(results, "distill")
    if r is None:
        return None
    rows = [[x["run"], x["heldout_ppl"], x["tokens"], x.get("tokens_per_second")] for x in r["rows"]]
    return (f"Student of {fmt(r['student_params'])} parameters, same init, same tokens; held-out: {r['heldout']}; "
            f"teacher perplexity {fmt(r['teacher_ppl'])}:\n\n"
            + md(["loss", "held-out perplexity", "tokens", "train tok/s"], rows)
            + f"\n\nBest distillation ({r['best_kd_loss']}) / cross-entropy: **{fmt(r['best_kd_vs_ce_ppl_ratio'])}**.\n\n"
            + source(r, "distill"))


@table("arena")
def _arena(results: Path) -> str | None:
    r = load(results, "arena")
    if r is None:
        return None
    a = r["archs"]
    c = r["decode"]["contexts"]
    lo, hi = str(c[0]), str(c[-1])

    def ms(x, k):
        d = x["decode_ms"]
        v = d.get(k) or d.get(int(k))
        return v["median"] if isinstance(v, dict) else v

    rows = [["parameters (active)", *(f"{fmt(x['parameters'])} ({fmt(x['active_parameters'])})" for x in a.values())],
            ["held-out perplexity per byte (mean +- sd)",
             *(f"{x['heldout_perplexity']['mean']:.2f} +- {x['heldout_perplexity']['std']:.2f}" for x in a.values())],
            ["training tok/s", *(fmt(x["train_tokens_per_s"]["mean"]) for x in a.values())],
            [f"decode ms/step at {lo} -> {hi} context", *(f"{fmt(ms(x, lo))} -> {fmt(ms(x, hi))}" for x in a.values())],
            [f"growth {hi} / {lo}", *(fmt(x["decode_growth"]) for x in a.values())]]
    return (md(["", *a], rows) + f"\n\n`attention_decode_growth` **{fmt(r['attention_decode_growth'])}**, "
            f"`ssm_decode_growth` **{fmt(r['ssm_decode_growth'])}**.\n\n" + source(r, "arena"))


@table("recall")
def _recall(results: Path) -> str | None:
    r = load(results, "recall")
    if r is None:
        return None
    pairs = [str(p) for p in sorted(r["config"]["pairs"])]
    rows = []
    for arch, a in r["archs"].items():
        for w, x in sorted(a["by_width"].items(), key=lambda kv: int(kv[0])):
            rows.append([f"{arch} (lr {a['lr']:g})", w, *(fmt(x["state_bytes_at_seq_len"][n]) for n in pairs),
                         *(f"{x['accuracy'][n]['mean']:.2f} [{x['accuracy'][n]['ci_low']:.2f}, "
                           f"{x['accuracy'][n]['ci_high']:.2f}]" for n in pairs)])
    c = r["config"]
    return (f"MQAR, vocabulary {c['vocab_size']}, {c['steps']} steps, {c['seeds']} seeds; accuracy: seed mean "
            f"[95% bootstrap interval over {c['eval_sequences']} test sequences per pair count]; state: fp32 bytes "
            f"of one sequence's decode state at 4 x pairs tokens:\n\n"
            + md(["architecture", "width", *(f"state, {n} pairs" for n in pairs), *(f"{n} pairs" for n in pairs)], rows)
            + f"\n\n`attention_worst_accuracy` (width {r['widest']}) **{fmt(r['attention_worst_accuracy'])}**.\n\n"
            + source(r, "recall"))


@table("finetune")
def _finetune(results: Path) -> str | None:
    r = load(results, "finetune")
    if r is None:
        return None
    x = r["lora"]
    rows = [["domain (held-out addresses)", x["domain_ppl_before"], x["domain_ppl_after"], f"**{fmt(x['domain_ppl_ratio'])}**"],
            ["general (LAMBADA)", x["general_ppl_before"], x["general_ppl_after"], f"**{fmt(x['general_ppl_ratio'])}**"]]
    return (f"LoRA, {fmt(x['trainable_params'])} trainable parameters, {x['steps']} steps ({fmt(x['tokens'])} tokens, "
            f"{fmt(x['minutes'])} min):\n\n" + md(["perplexity", "before", "after", "ratio"], rows)
            + "\n\n" + source(r, "finetune"))


@table("speculative")
def _speculative(results: Path) -> str | None:
    r = load(results, "speculative")
    if r is None:
        return None
    cell = lambda v, kind: f"{fmt(v[kind]['speedup'])}x" + (  # noqa: E731
        f" (acceptance {fmt(v[kind]['acceptance_rate'])})" if "acceptance_rate" in v[kind] else "") + (
        f", TTFT {fmt(v[kind]['ttft_ratio'])}x" if "ttft_ratio" in v[kind] else "")
    targets = r.get("by_target") or {"": {"settings": r["settings"]}}  # older files: one target
    rows = [[f"{t} {k}".strip(), cell(v, "chat"), cell(v, "grounded")]
            for t, by in targets.items() for k, v in by["settings"].items()]
    worst = (f", `worst_prompt_adaptive` **{fmt(r['worst_prompt_adaptive'])}** ({r['worst_prompt_setting']})"
             if "worst_prompt_adaptive" in r else "")
    head = f" ({r['headline_target']} target)" if "headline_target" in r else ""
    return (f"Decode-only speed-up over the target alone (batch 1, greedy, {r['new_tokens']} tokens, the mean over "
            f"prompts of each prompt's median; draft: {r['draft_model']}"
            + ("; TTFT: time to first token over the target's alone, a draft model reading the prompt in the prefill"
               if "ttft_ratio" in r["by_target"][r["headline_target"]]["settings"]["plain"]["chat"] else "")
            + "):\n\n"
            + md(["target, drafter", "chat prompts", "input-grounded prompts"], rows)
            + f"\n\n`best_speedup` **{fmt(r['best_speedup'])}** ({r['best_setting']}), `worst_slowdown` "
              f"**{fmt(r['worst_slowdown'])}** ({r['worst_setting']}){head}{worst}.\n\n" + source(r, "speculative"))


@table("test_time")
def _test_time(results: Path) -> str | None:
    r = load(results, "test_time")
    if r is None:
        return None
    runs, g = r["runs"], r["greedy"]
    rows = [[n, v["seconds"], v["seconds_vs_fp32_greedy"], v["accuracy"]["best_of_n"], v["accuracy"]["vote"],
             v["accuracy"]["weighted_vote"], v["accuracy"]["oracle"]] for n, v in runs.items()]
    eq = r["equal_time"]
    equal = "no int8 run fitted fp32 greedy's seconds" if eq is None else (
        f"at equal time (n = {eq['n']}, {eq['int8_seconds']} s against {eq['fp32_greedy_seconds']} s) the gain over fp32 "
        "greedy is " + ", ".join(f"{m} {fmt(v['mean'])} [{fmt(v['ci_low'])}, {fmt(v['ci_high'])}]"
                                 for m, v in eq["gain_vs_fp32_greedy"].items()))
    return (f"{r['questions']} checkable questions, {r['sampler_model']}, temperature {r['temperature']}; greedy "
            f"fp32 {fmt(g['fp32']['accuracy'])} in {g['fp32']['seconds']} s, greedy int8 {fmt(g['int8']['accuracy'])} "
            f"in {g['int8']['seconds']} s:\n\n"
            + md(["int8 samples n", "seconds", "x fp32 greedy's", "best-of-n", "majority vote", "weighted vote",
                  "oracle"], rows)
            + f"\n\n{equal} (95% bootstrap over questions); `equal_time_gain_ci_low` "
            f"**{fmt(r['equal_time_gain_ci_low'])}**.\n\n" + source(r, "test_time"))


@table("export")
def _export(results: Path) -> str | None:
    r = load(results, "export")
    if r is None:
        return None
    rows = [[k, mb(x.get("bytes")), x.get("perplexity"), x.get("ppl_vs_lilliput"), x.get("greedy_same_as_lilliput"),
             x.get("decode_tok_s")] for k, x in r["rows"].items()]
    return (f"Held-out: {r['heldout']}:\n\n"
            + md(["runtime, type", "size", "perplexity", "x lilliput", "greedy tokens = lilliput's", "decode-only tok/s"], rows)
            + f"\n\nGGUF Q8_0 perplexity ratio **{fmt(r['gguf_q8_0_ppl_ratio'], 5)}**, transformers max |logit diff| "
              f"**{fmt(r['hf_max_logit_diff'])}**, ONNX int4 **{fmt(r['onnx_int4_ppl_ratio'], 5)}** "
              f"(on a float model lilliput trained: {fmt(r['onnx_int4_trained_ppl_ratio'], 5)}).\n\n" + source(r, "export"))


@table("serve_load")
def _serve_load(results: Path) -> str | None:
    r = load(results, "serve_load")
    if r is None:
        return None
    rows = [[x["clients"], x["completed"], x["errors"], x["output_throughput"],
             f"{fmt(x['ttft']['p50_ms'])} / {fmt(x['ttft']['p99_ms'])} ms", f"{fmt(x['tpot']['p50_ms'])} ms",
             f"{fmt(x['itl']['p50_ms'])} / {fmt(x['itl']['p99_ms'])} ms"] for x in r["levels"]]
    return (f"{r['model']}, {r['max_batch']} rows, streaming clients for {fmt(r['duration_s'])} s per level:\n\n"
            + md(["clients", "requests", "errors", "output tok/s", "TTFT p50 / p99", "TPOT p50", "ITL p50 / p99"], rows)
            + f"\n\n`throughput_16_vs_1` **{fmt(r['throughput_16_vs_1'])}**; prefix cache: time to first token "
              f"**{fmt(r['ttft_prefix_cache_speedup'])}x** faster; constrained JSON valid "
              f"**{fmt(r['json_valid_constrained'])}** vs {fmt(r['json_valid_free'])} free.\n\n" + _soak(r)
            + source(r, "serve_load"))


def _soak(r: dict) -> str:
    """serve_load's soak in one sentence (files written before the soak have none)."""
    s = r.get("soak")
    if not s:
        return ""
    return (f"Soak ({r.get('weights', 'as served')} weights): {s['requests']} requests from {s['clients']} clients "
            f"({s['malformed']} malformed, {s['disconnects']} streams left mid-answer) after a warm-up of "
            f"{s['warmup_requests']}: server RSS {fmt(s['rss_after_warmup_mib']['rss'])} -> "
            f"{fmt(s['rss_at_end_mib']['rss'])} MiB, `soak_rss_growth` **{fmt(r['soak_rss_growth'])}**; "
            f"{s['errors']} errors, {s['malformed_not_4xx']} malformed bodies not refused with a 4xx.\n\n")


@table("router")
def _router(results: Path) -> str | None:
    r = load(results, "router")
    if r is None:
        return None
    rows = [[k, v["apgr"], v.get("accuracy_retained"), v.get("escalated_fraction")] for k, v in r["signals"].items()]
    spread = r.get("spread")
    if spread is None:  # a run before the calibration seeds and the recipe's small model
        return (f"Small {r['small']} ({fmt(r['small_acc'])}), large {r['large']} ({fmt(r['large_acc'])}), "
                f"{r['held_out_items']} held-out items:\n\n"
                + md(["signal", "APGR (random 0.5)", "accuracy retained", "escalated"], rows)
                + f"\n\n`accuracy_retained` **{fmt(r['accuracy_retained'])}** at `escalated_fraction` "
                  f"**{fmt(r['escalated_fraction'])}**.\n\n" + source(r, "router"))
    small = r.get("small_model") or {}
    made = (f"rebuilt by the recipe `{small.get('recipe')}`" if r.get("small_model_from_recipe")
            else "not rebuildable from the repository")
    per = lambda k: ", ".join(fmt(v) for v in spread[k]["per_seed"])  # noqa: E731
    return (f"Small {r['small']} ({made}, {mb(small.get('bytes'))}; accuracy {fmt(r['small_acc'])}), large "
            f"{r['large']} ({fmt(r['large_acc'])}), {r['held_out_items']} held-out items, means over "
            f"{len(r['seeds'])} calibration splits:\n\n"
            + md(["signal", "APGR (random 0.5)", "accuracy retained", "escalated"], rows)
            + f"\n\n`accuracy_retained` **{fmt(r['accuracy_retained'])}** (per split {per('accuracy_retained')}) at "
              f"`escalated_fraction` **{fmt(r['escalated_fraction'])}** (per split {per('escalated_fraction')}), "
              f"APGR {fmt(r.get('apgr'))}, signals chosen {', '.join(r['signals_chosen'])}.\n\n" + source(r, "router"))


@table("families")
def _families(results: Path) -> str | None:
    r = load(results, "families")
    if r is None:
        return None
    head = (f"{r.get('families_matching')} of {len(r.get('families', []))} families match transformers (logits, "
            f"greedy, batch), their GGUF and llama.cpp on every tiny specimen; {r.get('families_fast_path')} decode "
            f"on the fused C step; worst int8 fraction of the bandwidth limit at real shapes "
            f"{fmt(r.get('worst_int8_fraction_of_limit'))} (SmolLM2 {fmt(r.get('smollm2_int8_fraction_of_limit'))}).")
    specimens = [[name, s.get("family"), fmt(s.get("logits_max_diff")), fmt(s.get("greedy_equal")),
                  fmt(s.get("batch_equals_alone")), fmt(s.get("fast_path")),
                  fmt(s.get("gguf_max_diff")) if s.get("gguf_max_diff") is not None else "refused",
                  fmt(s.get("llama_cpp_greedy_equal"))] for name, s in (r.get("specimens") or {}).items()]
    refused = "; ".join(f"{name}: {s['gguf_refused']}" for name, s in (r.get("specimens") or {}).items()
                        if s.get("gguf_refused"))
    real = (r.get("real_shapes") or {}).get("models") or {}
    speeds = [[name, m.get("family"), f"{m.get('params', 0) / 1e6:,.0f}M",
               fmt((m.get("int8_decode_tok_s") or {}).get("median")), fmt(m.get("limit_tok_s")),
               fmt(m.get("int8_fraction_of_limit"))] for name, m in real.items()]
    return "\n\n".join([
        head,
        md(["specimen", "family", "logits max diff", "greedy", "batch = alone", "fused step", "GGUF max diff",
            "llama.cpp greedy"], specimens) + (f"\n\nGGUF refused: {refused}." if refused else ""),
        md(["real shapes (random weights)", "family", "params", "int8 decode tok/s (batch 1)", "limit tok/s",
            "fraction"], speeds),
        source(r, "families")])


# --- the capability x family matrix: bench/matrix.py's markers and format --------------------------

def matrix_block(results: Path) -> str | None:
    r = load(results, "matrix")
    if r is None:
        return None
    from lilliput.jobs import matrix

    return (f"{MATRIX_BEGIN}\n{matrix.markdown(r['table'])}\n\n"
            f"From `{r['command']}` (git {str(r.get('git_sha'))[:10]}, {r.get('created')}).\n{MATRIX_END}")


# --- bench/README.md ------------------------------------------------------------------------------

SKIP = {"command", "lilliput", "git_sha", "git_dirty", "created", "machine", "threads", "repeats", "new_tokens",
        "prompt_tokens", "quick", "seconds", "total_minutes", "wall_seconds", "limit", "n", "pp_tokens",
        "llama_cpp_install_seconds", "max_batch", "duration_s", "questions", "temperature", "top_p",
        "max_new_tokens", "held_out_items", "retain_target", "build_s", "kernel_lanes", "archs_trained",
        "student_params", "gguf_load_seconds", "errors", "same_prompt_tokens", "headline_sampling"}


NESTED: dict[str, Callable[[dict], dict]] = {
    "quantize": lambda r: {"int8 ppl_ratio": r["int8"]["ppl_ratio"], "int8 speedup_vs_fp32": r["int8"]["speedup_vs_fp32"],
                           "int4_g128_best ppl_ratio": r["int4_g128_best"]["ppl_ratio"]},
    "matrix": lambda r: r["counts"],
    "eval_smollm2": lambda r: {"lambada perplexity": r["lambada_perplexity"]["perplexity"],
                               **{k: v["lilliput"] for k, v in r["comparison"].items()}},
    "gemv": lambda r: {f"{k} kernel_gb_s": r[k].get("kernel_gb_s") for k in ("fp32", "bf16") if isinstance(r.get(k), dict)},
    "watermark": lambda r: {"tpr_at_fpr_1e-3": r["tpr_at_fpr_1e-3"], "ppl_cost": r["ppl_cost"],
                            "distortion_free tpr_at_fpr_1e-3": r["distortion_free"]["tpr_at_fpr_1e-3"],
                            "distortion_free ppl_cost": r["distortion_free"]["ppl_cost"],
                            "robustness replace_0.3 tpr": r["robustness"]["replace_0.3"]["tpr"],
                            "distortion_free replace_0.3 tpr": r["distortion_free"]["robustness"]["replace_0.3"]["tpr"]},
    "recall": lambda r: {"attention_worst_accuracy": r["attention_worst_accuracy"],
                         **{f"{a} at {max(r['config']['pairs'])} pairs": v for a, v in r["accuracy_at_most_pairs"].items()}},
    "textbook": lambda r: ({f"ppl_human at {x['synthetic_fraction']:g} synthetic": x["ppl_human"]["mean"]
                            for x in r["mixes"]} if "mixes" in r else
                           {f"ppl_human at {x['synthetic_fraction']:g} synthetic": x["ppl_human"] for x in r["students"]}),
}
"""Headline figures of the results files whose figures are nested."""


def headline(name: str, rec: dict) -> str:
    """The top-level scalar figures of a results file (its ratios and targets' fields)."""
    try:
        items = NESTED[name](rec).items() if name in NESTED else rec.items()
    except (KeyError, TypeError):
        items = rec.items()
    out = [f"`{k}` {fmt(v)}" for k, v in items if k not in SKIP and isinstance(v, (int, float))
           and not isinstance(v, bool) and not k.startswith(("bytes", "read_bandwidth"))]
    return ", ".join(out[:6]) or "(see the file)"


def bench_readme(results: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rerun import SCRIPTS  # the order and time estimates of `make results`

    lines = ["# Measurements", "",
             "Generated by `python bench/readme.py` from `bench/results/*.json`; do not edit by hand. Each file is the",
             "whole output of one run of its script (`make results` reruns them all in order) and records its",
             "command, git SHA, dirty flag, date and machine. Compare ratios across machines, not absolute speeds.",
             "Speeds are labelled as they are measured: *decode-only* tok/s counts the tokens after the first over",
             "the time after prefill; *end-to-end* tok/s counts every generated token over the whole call, prefill",
             "included (`lilliput.eval.efficiency`).", "",
             "| script | estimate | results file | date | machine | headline |", "|---|---|---|---|---|---|"]
    for s in SCRIPTS:
        rec = load(results, s.name)
        if rec is None:
            lines.append(f"| `bench/{s.name}.py` | {s.minutes:g} min | (not run) | | | |")
            continue
        m = rec.get("machine") or {}
        lines.append(f"| `bench/{s.name}.py` | {s.minutes:g} min | [{s.name}.json](results/{s.name}.json) | "
                     f"{str(rec.get('created', '?'))[:10]} | {m.get('cpu', '?')}, {m.get('cores', '?')} cores | "
                     f"{headline(s.name, rec).replace('|', '/')} |")
    lines += ["", "Tables of each file, by pillar: [shrink](../docs/shrink.md), [build](../docs/build.md), "
                  "[data](../docs/data.md), [run](../docs/run.md).", ""]
    return "\n".join(lines)


# --- rendering and checking ----------------------------------------------------------------------

def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every bench block (and the matrix block) regenerated from `results`."""
    def block(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r} in a bench block; known: {', '.join(TABLES)}")
        body = TABLES[name](results)
        body = body if body is not None else f"(`bench/results/{name}.json` is not there yet: run `bench/{name}.py`)"
        return f"<!-- bench:{name} begin (bench/readme.py) -->\n{body}\n<!-- bench:{name} end -->"

    text = BLOCK.sub(block, text)
    if MATRIX_BEGIN in text and MATRIX_END in text:
        mblock = matrix_block(results)
        if mblock is not None:
            text = re.sub(re.escape(MATRIX_BEGIN) + ".*?" + re.escape(MATRIX_END), lambda _: mblock, text, flags=re.S)
    return text


def pages(root: Path = ROOT, results: Path = RESULTS) -> dict[Path, str]:
    """{page: its text as this script would write it}, for every page that exists."""
    out = {root / p: render((root / p).read_text(), results) for p in PAGES if (root / p).is_file()}
    out[root / BENCH_README] = bench_readme(results)
    return out


def stale(root: Path = ROOT, results: Path = RESULTS) -> list[str]:
    """Pages whose tables disagree with the JSON files."""
    return [str(p.relative_to(root)) for p, text in pages(root, results).items()
            if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a page disagrees with the JSON")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for p in bad:
            print(f"{p} disagrees with bench/results: run python bench/readme.py", file=sys.stderr)
        return 1 if bad else 0
    for path, text in pages().items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
