"""`make demo`: the main job on the embedded default model, ending in a table and a report page.

It generates with SmolLM2-135M-Instruct, shrinks it with a shipped recipe (each stage measured:
held-out perplexity, task accuracy, size; the original's and the result's decode speed timed in
alternation at the end), generates with the result, benchmarks both (`lilliput bench`), writes the HTML
report and prints its tables: the figures on the screen are the page's, under the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lilliput.core.checkpoint import LoadConfig, load_model
from lilliput.core.options import nested
from lilliput.eval.efficiency import parameter_count
from lilliput.infer.generate import GenerationConfig, chat, generate
from lilliput.jobs.shrink import ShrinkJob, run_shrink

PROMPT = "Once upon a time, in a small village by the sea,"
QUESTION = "What is the capital of France?"
PEER = Path(__file__).resolve().parents[1] / "bench" / "results" / "vs_llamacpp.json"


@dataclass(frozen=True)
class DemoConfig:
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model to shrink."""
    out: str = "runs/demo"
    """Folder for the shrunk model (model/) and the report (report/)."""
    recipe: str = ShrinkJob.recipe
    """Recipe to run: a .toml file or a shipped name (demo, prune-heal-int8)."""
    max_new_tokens: int = 48
    """Tokens generated per sample."""
    bench: bool = True
    """Benchmark the original and the shrunk model side by side (`lilliput bench`, light settings) for the report."""


def _samples(model, tok, n: int, label: str) -> None:
    cfg = GenerationConfig(max_new_tokens=n)
    g = generate(model, tok, [PROMPT], cfg)[0]  # speeds come from the interleaved timing, not from one sample
    print(f"\n[{label}] > {PROMPT}{g.text}")
    print(f"[{label}] chat > {QUESTION}\n{chat(model, tok, [{'role': 'user', 'content': QUESTION}], cfg).text}")


def run_demo(cfg: DemoConfig) -> Path:
    import json

    from lilliput.eval.report import ReportConfig, make_report, summary_markdown

    out, load = Path(cfg.out), cfg.load
    model, tok = load_model(load.model, load.device, load.dtype)
    print(f"loaded {model.config.name}: {parameter_count(model) / 1e6:.1f}M parameters in {model.load_seconds:.1f} s")
    _samples(model, tok, cfg.max_new_tokens, "original")
    del model
    print(f"\nshrinking with recipe {cfg.recipe!r} (every stage measured):")
    shrunk = run_shrink(ShrinkJob(model=load.model, recipe=cfg.recipe, out=str(out / "model")))
    model, tok = load_model(str(shrunk))
    _samples(model, tok, cfg.max_new_tokens, "shrunk")
    del model
    run = json.loads((shrunk / "run.json").read_text())
    ev = run["recipe"]["eval"]
    runs = [str(shrunk / "run.json")]
    if cfg.bench:
        from lilliput.eval.bench import BenchConfig, run_bench

        print("\nbenchmarking the original and the shrunk model (each in its own process):")
        # the recipe's held-out text and window: one perplexity per model on the page
        run_bench(BenchConfig(models=(load.model, str(shrunk)), out=str(out / "bench"), passages=ev["passages"],
                              ppl_window=ev["window"], tasks=tuple(ev["tasks"]), task_limit=ev["limit"],
                              prompt_lengths=(64, 512), batch_sizes=(1, 4), new_tokens=32, repeats=2))
        runs.insert(0, str(out / "bench"))
    if PEER.is_file():  # a source checkout: the committed llama.cpp comparison joins the page
        runs.append(str(PEER))
    report = make_report(ReportConfig(runs=tuple(runs), out=str(out / "report"),
                                      title="lilliput demo: SmolLM2-135M-Instruct, shrunk"))
    # the page's own tables: every speed printed here is the report's, under the report's labels
    print(f"\n{summary_markdown(tuple(r for r in runs if r != str(PEER)))}\n")
    print(f"model:  {shrunk.resolve()}  (try: lilliput generate 'Hello' --model {shrunk})")
    print(f"report: {report.resolve()}")
    return report
