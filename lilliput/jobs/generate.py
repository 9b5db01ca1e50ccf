"""`lilliput generate` and `lilliput chat`: load a model, generate through the library, print (and record
the output in a provenance ledger when asked)."""

from __future__ import annotations

import codecs
import dataclasses
import re
import sys
from dataclasses import dataclass, field

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.options import flag, nested
from lilliput.infer.sequence import GenerationConfig
from lilliput.infer.speculative import SpeculationConfig
from lilliput.jobs.watermark import SCHEMES, watermark_processor


@dataclass(frozen=True)
class GenerateJob:
    prompt: str = field(metadata=flag(positional=True))
    """The text to continue (or, with --chat, the user's message)."""
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model."""
    sampling: GenerationConfig = field(default=GenerationConfig(), metadata=nested())
    """How to sample; a stop string's backslash escapes (`--stop "\\n\\n"`) are read as the characters they name."""
    chat: bool = field(default=False, metadata=flag(action="store_true"))
    """Wrap the prompt in the model's chat template."""
    json_schema: str | None = field(default=None, metadata=flag(metavar="FILE"))
    """Constrain the output to JSON valid under this schema."""
    no_stream: bool = field(default=False, metadata=flag(action="store_true"))
    """Print the text at the end, not as it comes."""
    speculate: str | None = field(default=None, metadata=flag(metavar="lookup|draft:MODEL"))
    """Speculative decoding with prompt lookup or a draft model sharing the tokenizer."""
    speculation: SpeculationConfig = field(default=SpeculationConfig(), metadata=nested())
    """With --speculate: draft lengths and their adaptation."""
    best_of: int | None = field(default=None, metadata=flag(metavar="N"))
    """Sample N answers sharing one prefill and print the one with the highest mean log-probability."""
    vote: bool = field(default=False, metadata=flag(action="store_true"))
    """With --best-of: the most frequent answer instead."""
    watermark: str | None = field(default=None, metadata=flag(metavar="KEY"))
    """Watermark the output with this secret key (detect with `lilliput watermark detect --key KEY --scheme
    SCHEME`)."""
    watermark_scheme: str = field(default=SCHEMES[0], metadata=flag(choices=SCHEMES))
    """green-list: Kirchenbauer et al. 2023 (biases the logits); gumbel: distortion-free Gumbel-max sampling
    (Aaronson; needs --temperature > 0)."""
    ledger: str | None = None
    """Record the output in this provenance ledger as synthetic text."""
    generation: int = 1
    """With --ledger: the output's generation (n for a model trained on generation n-1 data)."""

    def __post_init__(self):
        if self.best_of is not None and self.best_of < 1:
            raise ValueError(f"--best-of must be >= 1, got {self.best_of}")
        if self.speculate and self.best_of:
            raise ValueError("--speculate and --best-of do not combine yet: pick one")


@dataclass(frozen=True)
class ChatJob:
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model."""
    sampling: GenerationConfig = field(default=GenerationConfig(), metadata=nested())
    """How to sample each reply."""
    system: str | None = None
    """A system prompt."""
    no_stream: bool = field(default=False, metadata=flag(action="store_true"))
    """Print each reply at the end."""


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


def _sampling(cfg: GenerationConfig) -> GenerationConfig:
    return dataclasses.replace(cfg, stop=tuple(_unescape(s) for s in cfg.stop))


def _stream(no_stream: bool):
    if no_stream:
        return None
    return lambda row, delta: (sys.stdout.write(delta), sys.stdout.flush())


def run_generate(job: GenerateJob) -> None:
    from lilliput.infer.generate import chat, generate

    cfg = _sampling(job.sampling)
    model, tok = job.load.load()
    if job.speculate or job.best_of:
        return _generate_searched(job, cfg, model, tok)
    on_text = _stream(job.no_stream)
    procs = []
    if job.watermark:
        procs.append(watermark_processor(job.watermark_scheme, job.watermark))
    if job.json_schema:
        from lilliput.infer.grammar import JsonGrammar, read_schema

        procs.append(JsonGrammar.from_schema(tok, read_schema(job.json_schema), model.config.vocab_size).processor())
    if procs:  # the chat template rendered here, so the processors can ride on generate()
        prompt = tok.apply_chat_template([{"role": "user", "content": job.prompt}], add_generation_prompt=True) \
            if job.chat else job.prompt
        g = generate(model, tok, [prompt], cfg, on_text, bos=False if job.chat else None, processors=procs)[0]
    elif job.chat:
        g = chat(model, tok, [{"role": "user", "content": job.prompt}], cfg, on_text)
    else:
        g = generate(model, tok, [job.prompt], cfg, on_text)[0]
    if on_text is None:
        sys.stdout.write(g.text)
    print()
    print(f"[{len(g.tokens)} tokens, {g.timings['decode_tok_s']:.1f} tok/s, finish: {g.finish_reason}]",
          file=sys.stderr)
    if job.ledger:
        _record_generation(job, model, tok, cfg, g)


def _generate_searched(job: GenerateJob, cfg: GenerationConfig, model, tok) -> None:
    """--speculate and --best-of: one prompt through an engine, printed at the end."""
    from lilliput.infer.engine import Engine, EngineConfig

    prompt = tok.apply_chat_template([{"role": "user", "content": job.prompt}]) if job.chat else job.prompt
    bos = False if job.chat else None
    engine = Engine(model, tok, EngineConfig(max_batch=max(1, job.best_of or 1)))
    if job.speculate:
        from lilliput.infer.speculative import SpeculativeDecoder, make_drafter

        dec = SpeculativeDecoder(engine, make_drafter(job.speculate, engine), job.speculation)
        seq = dec.generate(prompt, cfg, bos=bos)
        note = ", ".join(f"{k} {v}" for k, v in dec.stats.as_dict().items())
    else:
        from lilliput.infer.search import choose, sample_n

        seqs = sample_n(engine, prompt, cfg, job.best_of, bos=bos)
        seq = choose(seqs, "vote" if job.vote else "best_of_n", extract=lambda t: " ".join(t.lower().split()) or None)
        note = f"best of {len(seqs)} by {'majority vote' if job.vote else 'mean log-probability'}"
    print(seq.text)
    print(f"[{len(seq.output)} tokens, finish: {seq.finish_reason}; {note}]", file=sys.stderr)


def _record_generation(job: GenerateJob, model, tok, cfg: GenerationConfig, g) -> None:
    """`generate --ledger`: the output as synthetic text, with the model, settings, seed and watermark key id."""
    from lilliput.data.ledger import Entry, Generator, Ledger, model_fingerprint
    from lilliput.data.watermark import key_id

    scheme = {"watermark_scheme": job.watermark_scheme} if job.watermark else {}
    gen = Generator(model=model_fingerprint(model), sampling=dataclasses.asdict(cfg) | scheme, seed=cfg.seed,
                    watermark_key_id=key_id(job.watermark) if job.watermark else None)
    with Ledger.open(job.ledger) as ledger:
        doc_id = ledger.add(Entry(text=g.text, tokens=len(g.tokens), tokenizer=repr(tok),
                                  source=f"lilliput generate ({job.load.model or 'embedded SmolLM2-135M-Instruct'})",
                                  origin="synthetic", generator=gen, generation=job.generation))
    print(f"[recorded as {doc_id} in {job.ledger}]", file=sys.stderr)


def run_chat(job: ChatJob) -> None:
    """One user message per line on stdin (/quit or /exit ends), each reply printed."""
    from lilliput.infer.generate import chat

    cfg = _sampling(job.sampling)
    model, tok = job.load.load()
    messages = [{"role": "system", "content": job.system}] if job.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        if interactive:
            print("bot> ", end="", flush=True)
        g = chat(model, tok, messages, cfg, _stream(job.no_stream))
        if job.no_stream:
            print(g.text, end="")
        print(flush=True)
        messages.append({"role": "assistant", "content": g.text})
