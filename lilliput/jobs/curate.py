"""`lilliput curate`: the datatrove curation pipeline with a model where it needs one.

data/ sits below the model code, so the two steps that need a model get it from here, as
picklable callables that load it inside each task (a local process, a Slurm job, a Ray actor):

- `PerplexityScorer`: texts -> perplexities under any lilliput model (a .gguf, a folder, a hub id,
  the embedded SmolLM2), each scored as `lilliput eval ppl` scores a file (one measurement);
- `TokenizerOf`: the tokenizer a watermark was generated with.

After a local or Ray run, the tasks' ledger shards are merged into the ledger when one is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.options import flag, nested
from lilliput.data.curate import CurateConfig, CurateResult, curate
from lilliput.data.ledger import Ledger
from lilliput.data.ledger_shards import merge


class PerplexityScorer:
    """texts -> perplexity of each (None for a text of fewer than 2 tokens), the model loaded at first use.

    Each text is scored as `lilliput eval ppl` scores a file (lilliput.eval.perplexity: windows of the
    model's context, `batch_size` windows per forward pass), over its first `max_tokens` tokens."""

    def __init__(self, load: LoadConfig, batch_size: int, max_tokens: int = 1024, model=None, tokenizer=None):
        self.load, self.batch_size, self.max_tokens = load, batch_size, max_tokens
        self._model, self._tok = model, tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None, "_tok": None}  # each task loads its own copy

    def __call__(self, texts: list[str]) -> list[float | None]:
        from lilliput.eval.perplexity import PerplexityConfig, perplexity

        if self._model is None:
            self._model, self._tok = self.load.load()
        window = min(PerplexityConfig.window, self._model.config.max_seq_len)
        cfg = PerplexityConfig(window=window, batch_size=self.batch_size, max_tokens=max(2, self.max_tokens))
        out: list[float | None] = []
        for text in texts:
            try:
                out.append(perplexity(self._model, self._tok, text, cfg)["perplexity"])
            except ValueError:  # an empty or one-token text: nothing to score
                out.append(None)
        return out


@dataclass(frozen=True)
class TokenizerOf:
    """Makes the tokenizer of a model (a picklable recipe: the tokenizer is built inside the task)."""

    load: LoadConfig = LoadConfig()

    def __call__(self):
        return self.load.load()[1]


@dataclass(frozen=True)
class CurateJob:
    input: tuple[str, ...] = field(metadata=flag(action="extend", nargs="+", metavar="PATH"))
    """JSON-lines or Parquet files ({id, text, ...}), or folders of them."""
    output: str
    """Folder for the kept documents: one JSON-lines shard per task."""
    ledger: str | None = None
    """Merge every verdict (kept or removed, with its reason) into this ledger."""
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model of the perplexity filter and of the watermark's tokenizer."""
    config: CurateConfig = field(default=CurateConfig(), metadata=nested())
    """The pipeline: filters, dedup, executor."""
    batch_size: int = 8
    """Documents per forward pass of the perplexity model."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print the summary as one JSON object."""


def curate_job(job: CurateJob) -> tuple[CurateResult, dict | None]:
    """Run the pipeline; merge its ledger shards into the job's ledger when given (not after a Slurm
    submission, whose jobs run later: then `lilliput data ledger merge`). Returns (result, merge summary or None)."""
    cfg, load = job.config, job.load
    if job.ledger is not None:
        Ledger.open(job.ledger).close()  # a bad ledger path fails before the pipeline runs
    scorer = PerplexityScorer(load, job.batch_size) if cfg.max_perplexity is not None else None
    tokenizer = TokenizerOf(load) if cfg.watermark_key is not None else None
    if scorer is not None or tokenizer is not None:
        load.load()  # a bad model fails here, in one line, not inside every task (each task loads its own)
    result = curate(list(job.input), job.output, cfg, perplexity=scorer, watermark_tokenizer=tokenizer)
    merged = None
    if job.ledger is not None and not result.submitted:
        with Ledger.open(Path(job.ledger)) as led:
            merged = merge([result.shards], led)
    return result, merged


def run_curate(job: CurateJob) -> None:
    """`lilliput curate`: run the job and print what it kept and removed."""
    result, merged = curate_job(job)
    if result.submitted:
        print(f"submitted; when the jobs end: lilliput data ledger merge {result.shards} --ledger LEDGER")
        return
    summary = {"input": list(job.input), "output": job.output, **result.summary(), "shards": str(result.shards),
               "ledger": job.ledger, "merged": merged}
    if job.json:
        print(json.dumps(summary))
        return
    print(f"kept {summary['kept']} of {summary['documents']} documents -> {job.output} ({summary['seconds']} s)")
    for name, n in summary["removed_by_filter"].items():
        print(f"  removed by {name}: {n}")
    for name, n in summary["tagged_by_filter"].items():
        print(f"  tagged by {name}: {n}")
    print(f"ledger: {job.ledger} ({merged['decisions']} decisions)" if merged else
          f"ledger shards: {result.shards} (lilliput data ledger merge {result.shards} --ledger LEDGER)")
