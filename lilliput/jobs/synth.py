"""`lilliput synth`: a teacher writes textbook-style documents on a list of topics, curated and recorded.

The prompts (topic x kind x persona x audience x length x wording, one seed per document) come
from lilliput.data.textbook; the teacher answers them through the engine, `max_batch` at a time
(continuous batching: a finished document's row takes the next prompt at once), until it has
written `tokens` tokens. The teacher is a model loaded here, or an OpenAI-compatible server
(`--teacher http://host:port`: vLLM serving a large model, `lilliput serve`), `max_batch`
requests in flight. Each answer becomes a document (a sentence cut off by the token budget
dropped), the documents go through the curation pipeline (lilliput.data.curate: exact + MinHash
dedup, C4 and Gopher rules), and every one of them enters the provenance ledger as synthetic,
with its generator (model fingerprint, or the served model's name and URL; sampling settings,
seed, prompt, watermark key id), together with curation's verdicts.

The watermark (the green list, or the distortion-free Gumbel-max sampling with `--watermark-scheme
gumbel`, which leaves the teacher's distribution as it is) works on the logits, so a served teacher
cannot be watermarked from here (`--watermark` with an http teacher is refused).

    out/documents.jsonl   the documents curation kept: {"id", "text", "topic", "kind", ...}
    out/run.json          the job, the teacher, token counts and speed, curation's summary
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lilliput.core.options import flag
from lilliput.core.record import run_record, write_json
from lilliput.data.curate import CurateConfig, CurateResult, curate_documents, write_documents
from lilliput.data.ledger import Entry, Generator, Ledger, default_ledger_path, model_fingerprint, sha256_text
from lilliput.data.textbook import TextbookPrompt, assemble, load_topics, textbook_prompts
from lilliput.eval.efficiency import parameter_count
from lilliput.infer.endpoint import is_endpoint
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig, Sequence
from lilliput.jobs.teacher_endpoint import TeacherEndpoint
from lilliput.jobs.watermark import SCHEMES, watermark_processor

DOCUMENTS_FILE = "documents.jsonl"


@dataclass(frozen=True)
class SynthJob:
    """`lilliput synth`: teacher, topics, token budget, sampling, curation, output folder and ledger."""

    teacher: str | None = None
    """A .gguf, model folder (e.g. `lilliput quantize` output: int8 is faster) or hub id; or the URL of an
    OpenAI-compatible server (http://host:port, e.g. vLLM serving a large teacher); the embedded
    SmolLM2-135M-Instruct when omitted."""
    teacher_model: str | None = None
    """With an http teacher: the served model's name (the first of its /v1/models when omitted)."""
    teacher_api_key: str | None = None
    """With an http teacher: its API key (sent as a Bearer token, never recorded); $OPENAI_API_KEY when omitted."""
    topics: str | None = None
    """A text file with one topic a line; the shipped list of ~100 (lilliput/data/topics.txt) when omitted."""
    tokens: int = 100_000
    """Teacher tokens to write in all (the last documents in flight finish, so a little more)."""
    out: str = "synth"
    """Output folder: documents.jsonl and run.json."""
    watermark: str | None = None
    """Watermark every document with this secret key (its id goes to the ledger, never the key)."""
    watermark_scheme: str = field(default=SCHEMES[0], metadata=flag(choices=SCHEMES))
    """green-list: Kirchenbauer et al. 2023 (biases the logits, so the documents drift from the teacher's);
    gumbel: distortion-free Gumbel-max sampling (Aaronson; the documents are distributed as the teacher's)."""
    ledger: str | None = None
    """The provenance ledger file; $LILLIPUT_CACHE/ledger.sqlite or ~/.cache/lilliput/ledger.sqlite when omitted."""
    seed: int = 0
    """Run seed: document i's prompt and sampler seed are a function of (seed, i)."""
    max_new_tokens: int = 384
    """Most tokens per document."""
    temperature: float = 0.8
    """Sampling temperature of the teacher."""
    top_k: int | None = 50
    """Sample among the teacher's k most likely tokens (None: off). Cheaper than top_p, whose sort of
    the whole vocabulary costs more than an int8 decode step per row on CPU."""
    top_p: float | None = None
    """Nucleus sampling of the teacher (None: off)."""
    repetition_penalty: float | None = 1.1
    """Penalty for tokens already in the prompt or answer (None: off); small teachers loop without one."""
    max_batch: int = 16
    """Documents the engine writes at once (requests in flight to an http teacher)."""
    quality: bool = True
    """Curation's C4 and Gopher quality rules (off: deduplication only)."""
    near_threshold: float = CurateConfig.near_threshold
    """Jaccard similarity of word 5-grams at which two documents are near-duplicates."""
    device: str | None = None
    """cpu or cuda; CUDA when available when omitted."""

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.watermark and is_endpoint(self.teacher):
            raise ValueError("a served (http) teacher cannot be watermarked from here: the watermark is a logits "
                             "processor and needs the logits; use a local teacher or drop --watermark")
        if self.watermark_scheme not in SCHEMES:
            raise ValueError(f"watermark_scheme must be one of {', '.join(SCHEMES)}, got {self.watermark_scheme!r}")
        if self.watermark and self.watermark_scheme == "gumbel" and self.temperature <= 0:
            raise ValueError("the gumbel watermark samples: it needs --temperature > 0")

    def sampling(self) -> GenerationConfig:
        """The teacher's settings (each document samples with its own seed)."""
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty)

    def curation(self) -> CurateConfig:
        return CurateConfig(c4=self.quality, gopher_quality=self.quality, gopher_repetition=self.quality,
                            near_threshold=self.near_threshold)


@dataclass(frozen=True)
class Written:
    """One teacher answer, before curation."""

    prompt: TextbookPrompt
    prompt_text: str
    """The prompt as the teacher saw it (chat template applied)."""
    text: str
    """The answer as generated."""
    tokens: int
    finish_reason: str
    index: int
    """Which prompt of the stream (answers finish out of order)."""


def write_textbook(engine: Engine, prompts: Iterable[TextbookPrompt], cfg: GenerationConfig, tokens: int,
                   processors: Callable[[], list] = list,
                   log: Callable[[str], None] | None = None) -> tuple[list[Written], float]:
    """Answers to `prompts` until about `tokens` tokens are written: (answers in prompt order, seconds).

    Rows are kept full while the tokens written plus those expected from the documents in flight
    (their mean length so far) stay under the budget; each answer samples with its prompt's seed."""
    tok, it = engine.tokenizer, iter(prompts)
    live: list[tuple[int, TextbookPrompt, str, Sequence]] = []
    done: list[Written] = []
    written, added, t0, last_log = 0, 0, time.perf_counter(), time.perf_counter()
    while True:
        expect = written / len(done) if done else cfg.max_new_tokens / 2
        while len(live) < engine.cfg.max_batch and \
                written + sum(max(len(s.output), expect) for *_, s in live) < tokens:
            p = next(it)
            text = tok.apply_chat_template(p.messages(), add_generation_prompt=True)
            seq = engine.add(text, dataclasses.replace(cfg, seed=p.seed), processors(), bos=False)
            live.append((added, p, text, seq))
            added += 1
        if not live:
            break
        engine.step()
        for i, p, text, s in [x for x in live if x[3].finished]:
            done.append(Written(p, text, s.text, len(s.output), s.finish_reason or "length", i))
            written += len(s.output)
        live = [x for x in live if not x[3].finished]
        if log is not None and time.perf_counter() - last_log > 30:
            last_log, dt = time.perf_counter(), time.perf_counter() - t0
            rate = (written + sum(len(s.output) for *_, s in live)) / dt
            log(f"synth: {len(done)} documents, {written:,}/{tokens:,} tokens, {rate:.0f} tok/s, "
                f"~{max(0.0, tokens - written) / max(rate, 1e-9) / 60:.1f} min left")
    return sorted(done, key=lambda w: w.index), time.perf_counter() - t0


def write_served(teacher: TeacherEndpoint, prompts: Iterable[TextbookPrompt], cfg: GenerationConfig, tokens: int,
                 max_batch: int, log: Callable[[str], None] | None = None) -> tuple[list[Written], float]:
    """`write_textbook` for a served teacher: the prompt recorded is the chat messages as sent (JSON)."""
    answers, seconds = teacher.write(prompts, cfg, tokens, max_batch, log)
    return [Written(p, json.dumps(p.messages(), ensure_ascii=False), text, n, finish, i)
            for i, p, text, n, finish in answers], seconds


def documents(written: list[Written]) -> list[dict]:
    """Answers as documents {"id": "synthetic/<sha256[:16]>-<seed hex>", "text", ...}; empty answers are dropped."""
    docs = []
    for w in written:
        text = assemble(w.text, cut=w.finish_reason == "length")
        if text:
            docs.append({"id": f"synthetic/{sha256_text(text)[:16]}-{w.prompt.seed:x}", "text": text,
                         "topic": w.prompt.topic, "kind": w.prompt.kind, "persona": w.prompt.persona,
                         "audience": w.prompt.audience, "seed": w.prompt.seed, "teacher_tokens": w.tokens,
                         "finish_reason": w.finish_reason, "prompt": w.prompt_text})
    return docs


def record(ledger: Ledger, docs: list[dict], result: CurateResult, generator: Generator, tokenizer: str,
           source: str, run: str) -> None:
    """Every document (kept or not) as synthetic text with its generator and prompt; then curation's verdicts."""
    ledger.add_many([Entry(text=d["text"], id=d["id"], tokens=d["teacher_tokens"], tokenizer=tokenizer,
                           source=f"{source}: {d['topic']}", origin="synthetic", generation=1,
                           generator=dataclasses.replace(generator, seed=d["seed"], prompt=d["prompt"]))
                     for d in docs])
    ledger.decide(result.decisions, run=run)


def run_synth(job: SynthJob, model=None, tokenizer=None, label: str | None = None,
              log: Callable[[str], None] | None = lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """Load the teacher (unless `model` and `tokenizer` are given, or the teacher is served), write, curate,
    record, save. Returns the output folder."""
    topics = load_topics(job.topics)  # a bad topics file fails before the teacher loads
    cfg = job.sampling()
    prompts = textbook_prompts(topics, job.seed)
    watermark_id = None
    if model is None and is_endpoint(job.teacher):
        teacher = TeacherEndpoint(job.teacher, job.teacher_model, job.teacher_api_key or os.environ.get("OPENAI_API_KEY"))
        label = label or teacher.label
        written, seconds = write_served(teacher, prompts, cfg, job.tokens, job.max_batch, log)
        fingerprint, sampling, tok_name, parameters = f"served:{teacher.label}", teacher.sampling(cfg), \
            f"the tokenizer of {teacher.model}", None
    else:
        if model is None:
            from lilliput.core.checkpoint import load_model
            from lilliput.eval.bench import model_label

            model, tokenizer = load_model(job.teacher, device=job.device)
            label = label or model_label(job.teacher)
        processors = list
        if job.watermark:
            wm = watermark_processor(job.watermark_scheme, job.watermark)
            watermark_id = wm.key_id
            processors = lambda: [wm]  # noqa: E731  (stateless: one processor serves every document)
        engine = Engine(model, tokenizer, EngineConfig(max_batch=job.max_batch))
        written, seconds = write_textbook(engine, prompts, cfg, job.tokens, processors, log)
        scheme = {"watermark_scheme": job.watermark_scheme} if job.watermark else {}
        fingerprint, sampling, tok_name, parameters = model_fingerprint(model), dataclasses.asdict(cfg) | scheme, \
            repr(tokenizer), parameter_count(model)
    label = label or job.teacher or "teacher"
    docs = documents(written)
    kept, result = curate_documents(docs, job.curation())
    generator = Generator(model=fingerprint, sampling=sampling, watermark_key_id=watermark_id)
    ledger_path = Path(job.ledger) if job.ledger else default_ledger_path()
    out = Path(job.out)
    with Ledger.open(ledger_path) as ledger:
        record(ledger, docs, result, generator, tok_name, f"lilliput synth ({label})", run=f"synth -> {out}")
    write_documents(out / DOCUMENTS_FILE, kept)
    tokens = sum(w.tokens for w in written)
    write_json(out / "run.json", run_record(
        "lilliput synth", label=f"textbook documents by {label}",
        job={**dataclasses.asdict(job), "watermark": watermark_id and "key id " + watermark_id,
             "teacher_api_key": job.teacher_api_key and "(given, not recorded)"},
        teacher={"label": label, "fingerprint": generator.model, "parameters": parameters},
        generator=dataclasses.asdict(generator), topics=len(topics), ledger=str(ledger_path),
        metrics={"answers": len(written), "documents": len(docs), "kept": len(kept),
                 "teacher_tokens": tokens, "kept_teacher_tokens": sum(d["teacher_tokens"] for d in kept),
                 "kept_bytes": sum(len(d["text"].encode("utf-8")) for d in kept),
                 "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
                 "cut_by_budget": sum(w.finish_reason == "length" for w in written),
                 "topics_covered": len({d["topic"] for d in kept}),
                 "curation": result.summary()}))
    if log is not None:
        log(f"synth: {len(kept)} of {len(docs)} documents kept ({tokens:,} teacher tokens, "
            f"{seconds:.0f} s) -> {out / DOCUMENTS_FILE}; ledger {ledger_path}")
    return out


def summary(out: Path) -> str:
    """One line for the terminal: what a run wrote."""
    return f"wrote {out / DOCUMENTS_FILE} and {out / 'run.json'}"
