"""lilliput's own datatrove pipeline steps: what datatrove lacks for honest data.

- `PerplexityFilter`: removes documents a reference model finds too surprising. The scorer is a
  callable (texts -> perplexities) the caller passes in: data/ sits below the model code, so
  `lilliput curate` builds it in lilliput.jobs.curate (any lilliput model, batched forward passes).
- `WatermarkFilter`: the Kirchenbauer detector (lilliput.data.watermark) over every document;
  text watermarked with the key is dropped, or kept and tagged (`action="tag"`).
- `LedgerExclusion`: an exclusion writer for any datatrove filter: each document the filter
  removes becomes a decision (id, filter, kept=False, reason) in the task's ledger shard.
- `LedgerWriter`: the last step of a pass; records each document that reached it (when asked)
  and closes the task's shard (lilliput.data.ledger_shards).

Steps are pickled into every task (a local process, a Slurm job, a Ray actor), so what they hold
must pickle: a model is loaded inside the task by the scorer, never carried in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from lilliput.data.ledger_shards import LedgerShard

REASON = "lilliput_reason"
"""Metadata key of a removal's full reason (datatrove's own reason names a stat, so it stays short)."""
INTERNAL = frozenset({"file_path", "filter_reason", REASON, "minhash_cluster_id", "duplicate_count"})
"""Metadata the pipeline adds for itself; not written to the output."""


def document_text(doc: Document) -> str:
    """What exact deduplication hashes (a named function: datatrove reads its return annotation)."""
    return doc.text


def output_record(writer, doc: Document) -> dict[str, Any]:
    """A kept document as written: {"id", "text", ...its other input fields} (a datatrove writer adapter)."""
    return {"id": doc.id, "text": doc.text, **{k: v for k, v in doc.metadata.items() if k not in INTERNAL}}


class LedgerExclusion:
    """A datatrove exclusion writer that records each removed document in the task's ledger shard."""

    def __init__(self, shard: LedgerShard, filter: str, reason: Callable[[Document], str] | None = None):
        self.shard, self.filter, self.reason = shard, filter, reason

    def __enter__(self) -> LedgerExclusion:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, document: Document, rank: int = 0, **kwargs) -> None:
        meta = document.metadata
        why = meta.pop(REASON, None) or (self.reason(document) if self.reason else None) \
            or meta.get("filter_reason") or "removed"
        self.shard.decide(rank, document.id, self.filter, False, why)


def near_duplicate_reason(doc: Document) -> str:
    return f"near-duplicate (MinHash cluster {doc.metadata.get('minhash_cluster_id', '?')})"


def exact_duplicate_reason(doc: Document) -> str:
    return "exact duplicate of an earlier document"


class LedgerWriter(PipelineStep):
    """Records every document that reaches it as kept (when `record_kept`), then closes the shard."""

    type = "📒 - LEDGER"
    name = "📒 lilliput ledger"

    def __init__(self, shard: LedgerShard, record_kept: bool = True, reason: str = "kept"):
        super().__init__()
        self.shard, self.record_kept, self.reason = shard, record_kept, reason

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data or ():
            if self.record_kept:
                cluster = doc.metadata.get("minhash_cluster_id", -1)
                self.shard.decide(rank, doc.id, "curate", True, self.reason if cluster == -1 else
                                  f"{self.reason}: the copy kept of MinHash cluster {cluster}")
            self.stat_update("recorded")
            yield doc
        self.shard.close(rank)


class PerplexityFilter(BaseFilter):
    """Removes documents whose perplexity under a reference model is above `max_perplexity`.

    `scorer(texts)` returns one perplexity per text, or None for a text it cannot score (removed
    as such). Documents are scored `batch_size` at a time."""

    name = "🔎 lilliput perplexity"

    def __init__(self, scorer: Callable[[list[str]], list[float | None]], max_perplexity: float,
                 batch_size: int = 8, exclusion_writer=None):
        super().__init__(exclusion_writer, batch_size=batch_size)
        self.scorer, self.max_perplexity = scorer, max_perplexity

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        scores = self.scorer([d.text for d in batch])
        out: list[bool | tuple[bool, str]] = []
        for doc, p in zip(batch, scores):
            if p is None:
                doc.metadata[REASON] = "cannot be scored (no tokens)"
                out.append((False, "perplexity_unscored"))
            elif p > self.max_perplexity:
                doc.metadata[REASON] = f"perplexity {p:.1f} > {self.max_perplexity}"
                out.append((False, "perplexity_above_max"))
            else:
                out.append(True)
        return out


ACTIONS = ("drop", "tag")


class WatermarkFilter(BaseFilter):
    """Detects the watermark of `key` in each document: `drop` removes the watermarked ones, `tag` keeps
    them with {"watermark_z", "watermark_key_id"} in their fields and a kept decision in the ledger.

    `tokenizer` makes the tokenizer the text was generated with (called once, inside the task)."""

    name = "💧 lilliput watermark"

    def __init__(self, key: str, tokenizer: Callable[[], Any], cfg=None, action: str = "drop",
                 exclusion_writer=None, ledger: LedgerShard | None = None):
        from lilliput.data.watermark import Detector, WatermarkConfig, key_id  # torch: only where it is used

        cfg = cfg or WatermarkConfig()
        if action not in ACTIONS:
            raise ValueError(f"watermark action must be one of {', '.join(ACTIONS)}, got {action!r}")
        super().__init__(exclusion_writer)
        self.detector, self.make_tokenizer, self.action, self.ledger = Detector(key, cfg), tokenizer, action, ledger
        self.key_id = key_id(key)
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._tokenizer is None:
            self._tokenizer = self.make_tokenizer()
        d = self.detector.detect_text(doc.text, self._tokenizer)
        if not d.watermarked:
            return True
        why = f"watermarked: z {d.z:.1f}, p {d.p_value:.1e} over {d.tokens_scored} tokens (key id {self.key_id})"
        if self.action == "drop":
            doc.metadata[REASON] = why
            return False, "watermarked"
        doc.metadata.update(watermark_z=round(d.z, 2), watermark_key_id=self.key_id)
        if self.ledger is not None:
            self.ledger.decide(self.rank, doc.id, "watermark", True, why + "; tagged")
        self.stat_update("tagged")
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.rank = rank
        yield from super().run(data, rank, world_size)
