"""The engine: continuous batching of requests over one model, one step at a time.

nano-vllm's split: a `Sequence` per request (sequence.py), a `Scheduler` that admits waiting
sequences into free rows and picks each step's work (scheduler.py), the `RowPool` it owns, which
places sequences in rows of the decode state (prefix cache, forks; row_pool.py), a `ModelRunner`
that only runs the model over the decode state (runner.py), the sampler (sampler.py), and
`Engine.step()` tying them together: schedule (admit, then one token for every decoding
sequence and one bounded chunk of waiting prompts), run (one batched forward), sample (each
sequence with its own settings, generator and logits processors), postprocess (append, stop,
retire finished sequences so their rows take new ones).

Every consumer goes through it: `generate`/`chat` (generate.py), the server, speculative
decoding (`verify` + `commit`), best-of-n (`fork`), the router.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from lilliput.core.model import GPT
from lilliput.infer import sampler
from lilliput.infer.row_pool import RowPool
from lilliput.infer.runner import ModelRunner
from lilliput.infer.sampling import LogitsProcessor
from lilliput.infer.scheduler import Scheduler
from lilliput.infer.sequence import GenerationConfig, Sequence, Status


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8
    """Rows of the decode state: sequences decoded together (more wait for a free row)."""
    max_len: int | None = None
    """Tokens per row (prompt + output); None means the model's context. Memory grows on demand."""
    prefill_chunk: int = 256
    """Most prompt tokens prefilled per step, bounding how long a long prompt stalls the others."""
    prefix_cache: bool = True
    """Reuse cached state for a prompt's prefix (a shared system prompt or few-shot preamble): a new
    request takes the free row that still holds its longest prefix, or copies the prefix from a
    running row, and prefills only the rest."""
    min_prefix: int = 8
    """Shortest shared prefix worth a row copy (rows that already hold one reuse any length)."""
    kv_dtype: str | None = None
    """Keys and values in the cache: "float32", "float16" or "bfloat16"; None: fp16 on CPU where the
    C step runs (half the bytes a batched step's attention reads, as llama.cpp's default), else the
    model's dtype."""

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.kv_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"kv_dtype must be float32, float16 or bfloat16, got {self.kv_dtype!r}")


@dataclass(frozen=True)
class EngineStats:
    """Where an engine's requests are, after its last step."""

    waiting: int
    """Sequences waiting for a row."""
    running: int
    """Sequences holding a row (prefilling or decoding)."""
    decoding: int
    """Sequences past their prompt: decoded together in the next step."""


class Engine:
    def __init__(self, model: GPT, tokenizer, cfg: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.max_len = min(cfg.max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.runner = ModelRunner(model, cfg.max_batch, min(self.max_len, 256),
                                  getattr(torch, cfg.kv_dtype) if cfg.kv_dtype else None)
        self.scheduler = Scheduler(RowPool(self.runner.state, cfg.prefix_cache, cfg.min_prefix), cfg.prefill_chunk)
        self.eos = set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id} - {None})

    @property
    def state(self):
        return self.runner.state

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def restarted(self) -> "Engine":
        """A fresh engine over the same model (after a failed step left this one's state in doubt)."""
        return Engine(self.model, self.tokenizer, self.cfg)

    # --- requests ---------------------------------------------------------------------------------

    def add(self, prompt: str | list[int], cfg: GenerationConfig = GenerationConfig(),
            processors: Iterable[LogitsProcessor] = (), on_text: Callable[[Sequence, str], None] | None = None,
            bos: bool | None = None) -> Sequence:
        """Queue a request (text or token ids); it starts as soon as a row is free."""
        ids = self.tokenizer.encode(prompt, bos=bos) if isinstance(prompt, str) else [int(t) for t in prompt]
        seq = Sequence(ids, cfg, list(processors), on_text)
        if len(ids) + cfg.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                             f"context of {self.max_len} tokens")
        seq.attach_stream(self.tokenizer, set() if cfg.ignore_eos else self.eos)
        if cfg.max_new_tokens == 0:
            seq.finish("length")
        else:
            self.scheduler.add(seq)
        return seq

    def add_n(self, prompt: str | list[int], cfg: GenerationConfig, n: int,
              processors: Callable[[], Iterable[LogitsProcessor]] | None = None,
              on_text: Callable[[Sequence, str], None] | None = None, bos: bool | None = None) -> list[Sequence]:
        """n samples of one prompt that share one prefill: the first prefills, the others copy its
        state and draw their first token from the same logits. Sample i samples with seed + i
        (when cfg has a seed); `processors()` makes each sample's own processors (they may hold
        per-sample state, as a grammar does)."""
        if not 1 <= n <= self.cfg.max_batch:
            raise ValueError(f"n must be in [1, max_batch={self.cfg.max_batch}], got {n}")
        make = processors or (lambda: ())
        cfgs = [cfg if cfg.seed is None else dataclasses.replace(cfg, seed=cfg.seed + i) for i in range(n)]
        first = self.add(prompt, cfgs[0], make(), on_text, bos)
        seqs = [first]
        for c in cfgs[1:]:
            f = Sequence(list(first.prompt), c, list(make()), on_text)
            f.attach_stream(self.tokenizer, first.eos)
            if c.max_new_tokens == 0:
                f.finish("length")
            else:
                first.followers.append(f)
            seqs.append(f)
        return seqs

    def abort(self, seq: Sequence) -> None:
        """Stop a request now (a client went away); its row is free after the next step."""
        self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        sched = self.scheduler
        return EngineStats(len(sched.waiting), len(sched.running),
                           sum(s.status is Status.RUNNING for s in sched.running))

    # --- one step -----------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """schedule -> run -> sample -> postprocess: admit, decode one token for every running
        sequence and prefill one chunk, sample, append and retire. Returns the sequences that
        finished in this step (aborted ones included)."""
        sched = self.scheduler
        finished = sched.retire()  # aborted since the last step
        decode, chunks = sched.schedule()
        for seqs, logits in self._run(decode, chunks):
            sched.postprocess(seqs, sampler.sample_batch(seqs, logits))
        return finished + sched.retire()

    def _run(self, decode: list[Sequence], chunks: list[tuple[Sequence, int]]) -> list[tuple[list[Sequence], torch.Tensor]]:
        """The model over one step's work -> (sequences, their logits (B, V)) to sample: the decoding
        sequences, then each prompt finished in this step with its followers (which share its logits).
        Decode tokens and prompt chunks share each pass over the weights where the C step takes both."""
        runner = self.runner
        prompt = [(s.row, s.prompt[s.computed:s.computed + n], "last" if s.computed + n == len(s.prompt) else "none")
                  for s, n in chunks]
        groups = []
        if decode and chunks and runner.can_mix(max(n for _, n in chunks)):
            out = runner.mixed([(s.row, [s.tokens[-1]], "last") for s in decode] + prompt)
            groups.append((decode, torch.stack(out[:len(decode)])))
            prompt_logits = out[len(decode):]
        else:
            if decode:
                groups.append((decode, runner.decode([s.tokens[-1] for s in decode], [s.row for s in decode])))
            prompt_logits = [runner.extend(*work) for work in prompt]
        for s in decode:
            s.computed += 1
        for (seq, n), logits in zip(chunks, prompt_logits):
            seq.computed += n
            if logits is not None:
                group = self.scheduler.prefilled(seq)
                groups.append((group, logits[None].expand(len(group), -1)))
        return groups

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.has_work():
            self.step()

    def generate(self, prompts: Iterable[str | list[int]], cfg: GenerationConfig = GenerationConfig(),
                 bos: bool | None = None) -> list[Sequence]:
        seqs = [self.add(p, cfg, bos=bos) for p in prompts]
        self.run()
        return seqs

    # --- drafts and samples that share a prefix ---------------------------------------------------------

    def verify(self, seq: Sequence, draft: list[int]) -> torch.Tensor:
        """Logits (k+1, V) of seq's pending token followed by k drafted tokens, from one forward.
        Row i predicts the token after draft[:i]. Follow with `commit` (which rewinds the state)."""
        if seq.status is not Status.RUNNING:
            raise ValueError(f"sequence {seq.id} is not decoding (status {seq.status.value})")
        if seq.computed + 1 + len(draft) > self.max_len:
            raise ValueError(f"{len(draft)} drafted tokens would pass the context of {self.max_len} tokens")
        out = self.runner.extend(seq.row, seq.pending() + list(draft), "all")
        return out

    def commit(self, seq: Sequence, tokens: list[int]) -> None:
        """Append accepted tokens (drafts that matched, then the corrected/bonus one) and rewind the
        state to the last of them, which stays pending as after a normal step."""
        for t in tokens:
            if seq.finished:
                break
            if seq.first_token_at is None:
                seq.first_token_at = time.perf_counter()
            seq.append(t)
        keep = min(self.state.lengths[seq.row], len(seq.tokens) - 1)
        self.state.truncate(seq.row, keep)
        seq.computed = keep

    def fork(self, seq: Sequence, n: int,
             processors: Callable[[], Iterable[LogitsProcessor]] | None = None) -> list[Sequence]:
        """n new sequences continuing seq's prompt on a copy of its prefilled state (best-of-n and
        `n` samples share one prefill; only the last prompt token is run again, per fork). Fork i
        samples with seed + 1 + i when seq's settings have a seed; `processors()` makes each fork's
        own processors. For samples known up front, `add_n` shares even the last prompt token."""
        if seq.status is not Status.RUNNING:
            raise ValueError("fork a sequence once its prompt is prefilled (status running)")
        free = len(self.scheduler.pool.free)
        if n > free:
            raise ValueError(f"{n} forks need {n} free rows, {free} are free")
        forks = []
        for i in range(n):
            c = seq.cfg if seq.cfg.seed is None else dataclasses.replace(seq.cfg, seed=seq.cfg.seed + 1 + i)
            f = Sequence(list(seq.prompt), c, list(processors() if processors else ()), seq.on_text)
            f.attach_stream(self.tokenizer, seq.eos)
            forks.append(f)
        self.scheduler.fork(seq, forks)
        return forks
