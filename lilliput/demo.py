"""`make demo`: the main job on the embedded default model, ending in a table and a report file.

Until the shrink stages land, the job loads SmolLM2-135M-Instruct, generates with it, measures
held-out perplexity (LAMBADA passages) and zero-shot task accuracy, and writes report.md +
run.json to the output folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lilliput.core.checkpoint import LoadConfig, load_model
from lilliput.core.record import run_record, write_json
from lilliput.eval.perplexity import PerplexityConfig, perplexity
from lilliput.eval.tasks import TaskConfig, evaluate_tasks, lambada_passages
from lilliput.infer.generate import GenerationConfig, chat, generate

PROMPTS = ("The three primary colours are", "Once upon a time, in a small village by the sea,")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    """Folder for report.md and run.json."""
    passages: int = 100
    """LAMBADA passages used as held-out perplexity text."""
    tasks: tuple[str, ...] = ("piqa", "arc_easy", "hellaswag", "lambada")
    """Tasks to score."""
    limit: int = 50
    """Items per task."""
    max_new_tokens: int = 64
    """Tokens generated per demo prompt."""


def held_out_text(passages: int) -> str:
    return "\n\n".join(lambada_passages(passages))


def run_demo(cfg: DemoConfig, load: LoadConfig = LoadConfig()) -> Path:
    out = Path(cfg.out)
    t0 = time.perf_counter()
    model, tok = load_model(load.model, load.device, load.dtype)
    print(f"loaded {model.config.name}: {model.num_params() / 1e6:.1f}M parameters in {model.load_seconds:.1f} s")

    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    samples = []
    for prompt in PROMPTS:
        g = generate(model, tok, [prompt], gen_cfg)[0]
        samples.append({"prompt": prompt, "text": g.text, "tok_s": g.timings["decode_tok_s"]})
        print(f"\n> {prompt}{g.text}\n  [{g.timings['decode_tok_s']:.1f} tok/s]")
    g = chat(model, tok, [{"role": "user", "content": "What is the capital of France?"}], gen_cfg)
    samples.append({"prompt": "chat: What is the capital of France?", "text": g.text, "tok_s": g.timings["decode_tok_s"]})
    print(f"\n> chat: What is the capital of France?\n{g.text}\n")

    ppl = perplexity(model, tok, held_out_text(cfg.passages), PerplexityConfig(window=1024))
    scores = evaluate_tasks(model, tok, TaskConfig(tasks=cfg.tasks, limit=cfg.limit))
    decode = sorted(s["tok_s"] for s in samples)[len(samples) // 2]

    rows = [("model", model.config.name), ("parameters", f"{model.num_params() / 1e6:.1f}M"),
            ("load time", f"{model.load_seconds:.2f} s"), ("decode (batch 1)", f"{decode:.1f} tok/s"),
            (f"perplexity ({ppl['tokens']} LAMBADA tokens)", f"{ppl['perplexity']:.3f}")]
    rows += [(f"{name} acc (n={m['n']})", f"{m['acc']:.3f}") for name, m in scores.items()]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text(f"# lilliput demo\n\n{table}\n\n## Samples\n\n"
                      + "\n\n".join(f"**{s['prompt']}**{s['text']}" for s in samples) + "\n")
    write_json(out / "run.json", run_record("lilliput demo", config=asdict(cfg), perplexity=ppl, tasks=scores,
                                            samples=samples, seconds=time.perf_counter() - t0,
                                            threads=torch.get_num_threads()))
    print(table)
    print(f"\nreport: {report.resolve()}")
    return report
