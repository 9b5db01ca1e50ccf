"""`lilliput curate`: the datatrove curation pipeline with a model where it needs one.

data/ sits below the model code, so the two steps that need a model get it from here, as
picklable callables that load it inside each task (a local process, a Slurm job, a Ray actor):

- `PerplexityScorer`: texts -> perplexities under any lilliput model (a .gguf, a folder, a hub id,
  the embedded SmolLM2), each scored as `lilliput eval ppl` scores a file (one measurement);
- `TokenizerOf`: the tokenizer a watermark was generated with.

After a local or Ray run, the tasks' ledger shards are merged into the ledger when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lilliput.core.checkpoint import LoadConfig
from lilliput.data.curate import CurateConfig, CurateResult, curate
from lilliput.data.ledger import Ledger
from lilliput.data.ledger_shards import merge


class PerplexityScorer:
    """texts -> perplexity of each (None for a text of fewer than 2 tokens), the model loaded at first use.

    Each text is scored as `lilliput eval ppl` scores a file (lilliput.eval.perplexity: windows of the
    model's context, `batch_size` windows per forward pass), over its first `max_tokens` tokens."""

    def __init__(self, load: LoadConfig = LoadConfig(), batch_size: int = 8, max_tokens: int = 1024,
                 model=None, tokenizer=None):
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


def run_curate(inputs: list[str], output: str, cfg: CurateConfig, load: LoadConfig = LoadConfig(),
               ledger: str | None = None, batch_size: int = 8) -> tuple[CurateResult, dict | None]:
    """Run the pipeline; merge its ledger shards into `ledger` when given (not after a Slurm submission,
    whose jobs run later: then `lilliput data ledger merge`). Returns (result, merge summary or None)."""
    if ledger is not None:
        Ledger.open(ledger).close()  # a bad ledger path fails before the pipeline runs
    scorer = PerplexityScorer(load, batch_size) if cfg.max_perplexity is not None else None
    tokenizer = TokenizerOf(load) if cfg.watermark_key is not None else None
    if scorer is not None or tokenizer is not None:
        load.load()  # a bad model fails here, in one line, not inside every task (each task loads its own)
    result = curate(inputs, output, cfg, perplexity=scorer, watermark_tokenizer=tokenizer)
    merged = None
    if ledger is not None and not result.submitted:
        with Ledger.open(Path(ledger)) as led:
            merged = merge([result.shards], led)
    return result, merged
