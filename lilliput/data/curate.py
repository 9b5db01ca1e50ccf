"""Curation as a datatrove pipeline: documents in, fewer and better documents out, with every
verdict and its reason in the ledger. It runs on one laptop (datatrove's local executor, several
processes), on Slurm or on Ray: the same steps, sharded by input file.

The stages, in order (each on or off in `CurateConfig`), all datatrove's unless named:

1. exact duplicates (`ExactDedupSignature` -> `ExactFindDedups` -> `ExactDedupFilter`): one copy stays;
2. C4's rules (`C4QualityFilter`: drops lines, then documents left with too few sentences);
3. Gopher's quality and repetition rules (`GopherQualityFilter`, `GopherRepetitionFilter`);
4. FineWeb's rules (`FineWebQualityFilter`), off by default;
5. the watermark detector (lilliput's `WatermarkFilter`): drops or tags synthetic text;
6. near-duplicates by MinHash LSH over word 5-grams (lilliput.data.shingles), in datatrove's four
   stages (signatures, buckets, clusters, filter) with lilliput's exact check of every candidate
   pair between buckets and clusters (lilliput.data.near_dedup); the bands and rows come from
   `near_threshold` and `near_recall` (`candidate_bands`; `lsh_params` without the check);
7. perplexity under a reference model (lilliput's `PerplexityFilter`), above `max_perplexity`
   removed. The scorer is a callable (texts -> perplexities) the caller passes in: data/ sits
   below the model code, so `lilliput curate` builds it in lilliput.jobs.curate.

datatrove's rules (2-4) tokenize with spaCy through lilliput.data.word_tokenizer: the same words
and sentences, without re-building spaCy's vocabulary at every call.

Every task records its verdicts in its own ledger shard (lilliput.data.ledger_shards): a removal
with its filter and reason, and a "kept" decision for every document that comes out.

    result = curate(["corpus/"], "curated/", CurateConfig(tasks=4, workers=2))
    result.summary()                      # {"documents", "kept", "removed_by_filter", ...}
    merge([result.shards], into=Ledger.open("ledger.sqlite"))

Inputs are JSON-lines (.jsonl, .jsonl.gz, .json) and Parquet files with a "text" column (and an
"id"; datatrove names documents without one "<file>/<line>"), or folders of them. The output is a
folder of JSON-lines shards, one per task: {"id", "text", ...the input's other fields}. The work
folder (`<output>.work` unless given) holds signatures, logs and datatrove's completions: run the
same command again and finished tasks are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

EXECUTORS = ("local", "slurm", "ray")
FILTERS = ("exact_dedup", "c4", "gopher_quality", "gopher_repetition", "fineweb", "watermark", "near_dedup",
           "perplexity")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class CurateConfig:
    exact_dedup: bool = True
    """Remove documents whose text is byte-identical to another one's (one copy stays)."""
    c4: bool = True
    """Apply C4's rules (drop lines without terminal punctuation, short lines, boilerplate; then pages
    with fewer than 5 sentences, curly brackets or lorem ipsum)."""
    gopher_quality: bool = True
    """Apply Gopher's quality rules (length, word length, symbols, bullets, stop words)."""
    gopher_repetition: bool = True
    """Apply Gopher's repetition rules (duplicate lines, paragraphs and n-grams)."""
    fineweb: bool = False
    """Apply FineWeb's rules (punctuated lines, short lines, duplicated lines, list-like pages)."""
    near_dedup: bool = True
    """Remove near-duplicates found by MinHash LSH (datatrove's four stages)."""
    near_threshold: float = 0.8
    """Jaccard similarity of word 5-gram sets (lilliput.data.shingles) from which two documents are
    near-duplicates."""
    near_check: bool = True
    """Compute the exact Jaccard of every pair the LSH bands propose and keep those >= near_threshold;
    off: the bands alone decide (datatrove's way: pairs near the threshold go either way)."""
    near_recall: float = 0.99
    """With near_check: the chance that a pair at exactly near_threshold is proposed (more bands of
    fewer rows: more recall, more candidates to check)."""
    minhash_hashes: int = 112
    """Hash functions per MinHash signature (split into bands of rows)."""
    max_perplexity: float | None = None
    """Remove documents whose perplexity under the reference model is above this; None: off."""
    watermark_key: str | None = None
    """Detect text watermarked with this key (None: off); what happens to it: `watermark_action`."""
    watermark_action: str = "drop"
    """drop: remove watermarked documents; tag: keep them with watermark_z and watermark_key_id fields."""
    executor: str = "local"
    """local (processes on this machine), slurm (sbatch jobs) or ray (the cluster at RAY_ADDRESS, else a
    local one)."""
    tasks: int = 1
    """Tasks per stage; input files are dealt out to them (more tasks than files leaves some idle)."""
    workers: int | None = None
    """Tasks run at once (None: all of them)."""
    work: str | None = None
    """Folder for signatures, logs, ledger shards and completions; `<output>.work` when omitted."""
    slurm_partition: str | None = None
    """Slurm: the partition to submit to (required with executor=slurm)."""
    slurm_time: str = "24:00:00"
    """Slurm: time limit of each job."""
    cpus_per_task: int = 1
    """Slurm and Ray: CPUs reserved per task."""
    mem_per_cpu_gb: float = 2.0
    """Slurm and Ray: memory reserved per CPU, in GB."""
    ledger_commit_every: int = 1000
    """Verdicts a task commits to its ledger shard at once (a killed task keeps what it committed)."""

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near_threshold must be in (0, 1], got {self.near_threshold}")
        if self.ledger_commit_every < 1:
            raise ValueError(f"ledger_commit_every must be >= 1, got {self.ledger_commit_every}")
        if not 0.0 < self.near_recall < 1.0:
            raise ValueError(f"near_recall must be in (0, 1), got {self.near_recall}")
        if self.minhash_hashes < 2:
            raise ValueError(f"minhash_hashes must be >= 2, got {self.minhash_hashes}")
        if self.watermark_action not in ("drop", "tag"):
            raise ValueError(f"watermark_action must be drop or tag, got {self.watermark_action!r}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise ValueError("executor=slurm needs --slurm-partition (the Slurm partition to submit to)")

    def minhash(self):
        """datatrove's MinhashConfig: (bands, rows) from `candidate_bands` with near_check (recall first:
        the check restores precision), else from `lsh_params`."""
        from datatrove.pipeline.dedup.minhash import MinhashConfig

        from lilliput.data.near_dedup import candidate_bands
        from lilliput.data.shingles import N

        bands, rows = (candidate_bands(self.near_threshold, self.minhash_hashes, self.near_recall) if self.near_check
                       else lsh_params(self.near_threshold, self.minhash_hashes))
        return MinhashConfig(n_grams=N, num_buckets=bands, hashes_per_bucket=rows)


# --- LSH bands (datatrove takes bands and rows; people think in Jaccard thresholds) -------------------

def _integrate(f, a: float, b: float, steps: int = 200) -> float:
    h = (b - a) / steps
    return sum(f(a + (k + 0.5) * h) for k in range(steps)) * h


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimising the weighted false-positive + false-negative
    probability mass around `threshold` (datasketch's choice; its weights are 0.5 and 0.5): a pair of
    Jaccard similarity s shares a band with probability 1 - (1 - s^rows)^bands."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = _integrate(lambda s: (1 - s ** r) ** b, threshold, 1.0)
            err = (1 - fn_weight) * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


# --- inputs -------------------------------------------------------------------------------------------

def _format(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def input_files(paths: list[str | Path]) -> dict[str, list[Path]]:
    """{"jsonl": [...], "parquet": [...]}: the files named, and those under the folders named (sorted)."""
    found: dict[str, list[Path]] = {"jsonl": [], "parquet": []}
    for p in map(Path, paths):
        if p.is_dir():
            files = [f for f in sorted(p.rglob("*")) if f.is_file() and _format(f)]
            if not files:
                raise FileNotFoundError(f"no JSON-lines or Parquet files under {p}")
            for f in files:
                found[_format(f)].append(f.resolve())
        elif p.is_file():
            if _format(p) is None:
                raise ValueError(f"{p} is neither JSON lines (.jsonl, .jsonl.gz, .json) nor Parquet (.parquet)")
            found[_format(p)].append(p.resolve())
        else:
            raise FileNotFoundError(f"input {p} not found; pass JSON-lines or Parquet files, or folders of them")
    return found


def _readers(files: dict[str, list[Path]], work: Path) -> list:
    """One datatrove reader per format, each over a paths file (relative to the files' common folder)."""
    from datatrove.pipeline.readers import JsonlReader, ParquetReader

    readers = []
    for fmt, cls in (("jsonl", JsonlReader), ("parquet", ParquetReader)):
        if not files[fmt]:
            continue
        root = Path(os.path.commonpath([f.parent for f in files[fmt]]))
        listing = work / f"inputs.{fmt}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{f.relative_to(root).as_posix()}\n" for f in files[fmt]))
        readers.append(cls(str(root), paths_file=str(listing)))
    return readers


# --- the pipeline -------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One pass of the pipeline: its steps and how many tasks run them."""

    name: str
    steps: list
    tasks: int


def stages(inputs: list[str | Path], output: str | Path, cfg: CurateConfig,
           perplexity: Callable[[list[str]], list[float | None]] | None = None,
           watermark_tokenizer: Callable[[], object] | None = None, run: str = "") -> list[Stage]:
    """The passes `curate` runs, in order."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, \
        ExactFindDedups
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from lilliput.data.curate_steps import (LedgerExclusion, LedgerWriter, PerplexityFilter, WatermarkFilter,
                                            document_text, exact_duplicate_reason, near_duplicate_reason,
                                            output_record)
    from lilliput.data.ledger_shards import LedgerShard
    from lilliput.data.near_dedup import ShingleSignature, VerifyCandidates
    from lilliput.data.word_tokenizer import CachedSpaCyTokenizer

    if cfg.max_perplexity is not None and perplexity is None:
        raise ValueError("max_perplexity is set but no perplexity scorer was given (texts -> perplexities)")
    if cfg.watermark_key is not None and watermark_tokenizer is None:
        raise ValueError("watermark_key is set but no tokenizer was given to detect it with")
    output, work = Path(output), work_folder(output, cfg)
    files = input_files(inputs)
    n = cfg.tasks
    out: list[Stage] = []
    exact = ExactDedupConfig(content_getter=document_text)
    words = CachedSpaCyTokenizer("en")

    def writer(folder: Path):
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=output_record)

    if cfg.exact_dedup:
        out.append(Stage("exact_signatures", [*_readers(files, work), ExactDedupSignature(str(work / "exact" / "sigs"),
                                                                                           exact)], n))
        out.append(Stage("exact_find", [ExactFindDedups(str(work / "exact" / "sigs"), str(work / "exact" / "dups"),
                                                        exact)], 1))
    two_passes = cfg.near_dedup
    first = LedgerShard(work / "ledger", "filter" if two_passes else "final", run=run,
                        commit_every=cfg.ledger_commit_every)
    steps: list = _readers(files, work)
    if cfg.exact_dedup:
        steps.append(ExactDedupFilter(str(work / "exact" / "dups"), exact,
                                      exclusion_writer=LedgerExclusion(first, "exact_dedup", exact_duplicate_reason)))
    for name, on, make in (("c4", cfg.c4, C4QualityFilter), ("gopher_quality", cfg.gopher_quality, GopherQualityFilter),
                           ("gopher_repetition", cfg.gopher_repetition, GopherRepetitionFilter),
                           ("fineweb", cfg.fineweb, FineWebQualityFilter)):
        if on:  # one tokenizer for all: the rules' caches (datatrove's split_into_parts) are keyed by it
            steps.append(make(exclusion_writer=LedgerExclusion(first, name), language=words))
    if cfg.watermark_key is not None:
        steps.append(WatermarkFilter(cfg.watermark_key, watermark_tokenizer, action=cfg.watermark_action,
                                     exclusion_writer=LedgerExclusion(first, "watermark"), ledger=first))
    last, final = first, steps
    if two_passes:
        mh, sigs, buckets = cfg.minhash(), str(work / "minhash" / "sigs"), str(work / "minhash" / "buckets")
        filtered = work / "filtered"
        out.append(Stage("filter", [*steps, LedgerWriter(first, record_kept=False), writer(filtered)], n))
        out.append(Stage("minhash_signatures", [JsonlReader(str(filtered)),
                                                ShingleSignature(sigs, mh, keep_sets=cfg.near_check)], n))
        bucket_steps = [MinhashDedupBuckets(sigs, buckets, config=mh)]
        if cfg.near_check:  # candidates -> the pairs whose shingle sets reach the threshold
            pairs = str(work / "minhash" / "pairs")
            bucket_steps.append(VerifyCandidates(buckets, sigs, pairs, mh, cfg.near_threshold))
        else:
            pairs = buckets
        out.append(Stage("minhash_buckets", bucket_steps, mh.num_buckets))
        out.append(Stage("minhash_clusters", [MinhashDedupCluster(pairs, str(work / "minhash" / "remove"), config=mh,
                                                                  save_cluster_id=True)], 1))
        last = LedgerShard(work / "ledger", "final", run=run, commit_every=cfg.ledger_commit_every)
        final = [JsonlReader(str(filtered)),
                 MinhashDedupFilter(str(work / "minhash" / "remove"), load_cluster_ids=True,
                                    exclusion_writer=LedgerExclusion(last, "near_dedup", near_duplicate_reason))]
    if cfg.max_perplexity is not None:
        final.append(PerplexityFilter(perplexity, cfg.max_perplexity, exclusion_writer=LedgerExclusion(last, "perplexity")))
    out.append(Stage("final", [*final, LedgerWriter(last, record_kept=True), writer(output)], n))
    return out


def work_folder(output: str | Path, cfg: CurateConfig) -> Path:
    return Path(cfg.work) if cfg.work else Path(str(Path(output)) + ".work")


def _executor(stage: Stage, cfg: CurateConfig, logs: Path, depends=None):
    workers = 1 if stage.tasks == 1 else min(cfg.workers or stage.tasks, stage.tasks)
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        # forked workers start at once (a forkserver's import datatrove, spaCy and lilliput again: ~7 s a stage
        # on 2 cores); a step that runs a model forks no worker: torch's OpenMP threads do not survive a fork
        model = cfg.max_perplexity is not None or cfg.watermark_key is not None
        return LocalPipelineExecutor(stage.steps, tasks=stage.tasks, workers=workers, logging_dir=str(logs),
                                     start_method="forkserver" if model else "fork")
    if cfg.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(stage.steps, tasks=stage.tasks, workers=workers, logging_dir=str(logs),
                                   cpus_per_task=cfg.cpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb)
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(stage.steps, tasks=stage.tasks, workers=cfg.workers or -1, time=cfg.slurm_time,
                                 partition=cfg.slurm_partition, cpus_per_task=cfg.cpus_per_task,
                                 mem_per_cpu_gb=int(cfg.mem_per_cpu_gb), job_name=f"lilliput-curate-{stage.name}",
                                 logging_dir=str(logs), depends=depends,
                                 venv_path=str(Path(sys.prefix) / "bin" / "activate"))


# --- running it ---------------------------------------------------------------------------------------

@dataclass
class CurateResult:
    output: Path
    shards: Path
    """The folder of ledger shards (`lilliput data ledger merge` folds them into a ledger)."""
    decisions: list[tuple[str, str, bool, str]] = field(default_factory=list)
    """(id, filter, kept, reason) of every verdict; empty after a Slurm submission (the jobs run later)."""
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage."""
    submitted: bool = False
    """True when the stages were submitted (Slurm) rather than run."""

    def removed(self) -> list[tuple[str, str, bool, str]]:
        return [d for d in self.decisions if not d[2]]

    def kept_ids(self) -> list[str]:
        return [d[0] for d in self.decisions if d[1] == "curate" and d[2]]

    def summary(self) -> dict:
        """{"documents", "kept", "removed_by_filter": {filter: n}, "tagged_by_filter": {filter: n}}."""
        kept = len(self.kept_ids())
        removed = Counter(d[1] for d in self.removed())
        return {"documents": kept + sum(removed.values()), "kept": kept, "removed_by_filter": dict(removed),
                "tagged_by_filter": dict(Counter(d[1] for d in self.decisions if d[2] and d[1] != "curate")),
                "seconds": round(self.seconds, 2), "stage_seconds": self.stage_seconds}


def read_shards(folder: Path) -> list[tuple[str, str, bool, str]]:
    """Every decision in a folder of complete ledger shards, shard by shard."""
    from lilliput.data.ledger_shards import shard_files

    out = []
    for shard in shard_files([folder]):
        conn = sqlite3.connect(f"file:{shard}?mode=ro", uri=True)
        try:
            out += [(i, f, bool(k), r) for i, f, k, r in
                    conn.execute("SELECT id, filter, kept, reason FROM decisions ORDER BY rowid")]
        finally:
            conn.close()
    return out


def curate(inputs: list[str | Path], output: str | Path, cfg: CurateConfig = CurateConfig(),
           perplexity: Callable[[list[str]], list[float | None]] | None = None,
           watermark_tokenizer: Callable[[], object] | None = None) -> CurateResult:
    """Build the pipeline and run it on `cfg.executor`; returns the verdicts (after Slurm: a submission)."""
    work = work_folder(output, cfg)
    plan = stages(inputs, output, cfg, perplexity, watermark_tokenizer, run=f"curate -> {output}")
    t0, seconds = time.perf_counter(), {}
    if cfg.executor == "slurm":  # sbatch jobs chained by dependencies; nothing runs here
        job = None
        for stage in plan:
            job = _executor(stage, cfg, work / "logs" / stage.name, depends=job)
        job.run()
        return CurateResult(Path(output), work / "ledger", seconds=time.perf_counter() - t0, submitted=True)
    if cfg.executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    for stage in plan:
        ex = _executor(stage, cfg, work / "logs" / stage.name)
        t = time.perf_counter()
        ex.run()
        seconds[stage.name] = round(time.perf_counter() - t, 2)
        if missing := ex.get_incomplete_ranks(skip_completed=True):
            raise RuntimeError(f"curation stage {stage.name}: tasks {missing[:5]} did not finish; see "
                               f"{work / 'logs' / stage.name / 'logs'} and run the same command again to resume")
    return CurateResult(Path(output), work / "ledger", read_shards(work / "ledger"), time.perf_counter() - t0, seconds)


# --- documents in memory (what `lilliput synth` curates) ---------------------------------------------

def curate_documents(docs: list[dict], cfg: CurateConfig = CurateConfig(),
                     perplexity: Callable[[list[str]], list[float | None]] | None = None,
                     ) -> tuple[list[dict], CurateResult]:
    """Curate documents held in memory ({"id", "text", ...}) with one local task; returns the kept
    ones (input order) and the result. Ids must be unique."""
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i, k in Counter(ids).items() if k > 1)
        raise ValueError(f"document id {dup!r} appears twice in the input; ids must be unique")
    with tempfile.TemporaryDirectory(prefix="lilliput-curate-") as tmp:
        src = Path(tmp) / "in" / "documents.jsonl"
        src.parent.mkdir()
        src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        one = dataclasses.replace(cfg, executor="local", tasks=1, workers=1, work=None)
        result = curate([src], Path(tmp) / "out", one, perplexity=perplexity)
        kept = {}
        for f in sorted((Path(tmp) / "out").glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                kept[row["id"]] = row
    return [kept[i] for i in ids if i in kept], result


def write_documents(path: Path | str, docs: list[dict]) -> Path:
    """JSON lines {"id", "text", ...}, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
