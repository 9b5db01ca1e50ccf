"""The engine: continuous batching of requests over one model, one step at a time.

nano-vllm's split: a `Sequence` per request (sequence.py), a `Scheduler` that admits waiting
sequences into free rows and picks each step's work (scheduler.py), a `ModelRunner` that only
runs the model over the decode state (runner.py), and `Engine.step()` tying them together:
decode one token for every running sequence in one batched forward, prefill one bounded chunk
of waiting prompts, sample each sequence with its own settings, generator and logits
processors, and retire finished sequences so their rows take new ones.

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
from lilliput.infer import kernels
from lilliput.infer.runner import ModelRunner
from lilliput.infer.sampling import LogitsProcessor, filtered_logits
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


class Engine:
    def __init__(self, model: GPT, tokenizer, cfg: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.max_len = min(cfg.max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.runner = ModelRunner(model, cfg.max_batch, min(self.max_len, 256),
                                  getattr(torch, cfg.kv_dtype) if cfg.kv_dtype else None)
        self.scheduler = Scheduler(cfg.max_batch, cfg.prefill_chunk)
        self.eos = set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id} - {None})
        self.row_tokens: list[list[int]] = [[] for _ in range(cfg.max_batch)]  # what each free row's state holds

    @property
    def state(self):
        return self.runner.state

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

    # --- one step -----------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Decode one token for every running sequence, prefill one chunk, admit and retire.
        Returns the sequences that finished in this step."""
        sched, runner = self.scheduler, self.runner
        finished = self._retire()  # aborted since the last step
        sched.admit(self._place)
        decode, chunks = sched.schedule()
        if decode and chunks and runner.can_mix(max(n for _, n in chunks)):
            self._mixed_step(decode, chunks)
            return finished + self._retire()
        if decode:
            logits = runner.decode([s.tokens[-1] for s in decode], [s.row for s in decode])
            self._sample_all(decode, logits)
            for s in decode:
                s.computed += 1
        for seq, n in chunks:
            start = seq.computed
            last = start + n == len(seq.prompt)
            out = runner.extend(seq.row, seq.prompt[start:start + n], "last" if last else "none")
            seq.computed += n
            if last:
                seq.status = Status.RUNNING
                group = [seq] + self._start_followers(seq)
                self._sample_all(group, out[None].expand(len(group), -1))
        return finished + self._retire()

    def _mixed_step(self, decode: list[Sequence], chunks: list[tuple[Sequence, int]]) -> None:
        """The step's decode tokens and prompt chunks through the C step together, sharing each
        pass over the weights; sampled in the same order as the separate path."""
        work = [(s.row, [s.tokens[-1]], "last") for s in decode]
        for seq, n in chunks:
            done = seq.computed + n == len(seq.prompt)
            work.append((seq.row, seq.prompt[seq.computed:seq.computed + n], "last" if done else "none"))
        out = self.runner.mixed(work)
        self._sample_all(decode, torch.stack(out[:len(decode)]))
        for s in decode:
            s.computed += 1
        for (seq, n), logits in zip(chunks, out[len(decode):]):
            seq.computed += n
            if logits is not None:
                seq.status = Status.RUNNING
                group = [seq] + self._start_followers(seq)
                self._sample_all(group, logits[None].expand(len(group), -1))

    def _start_followers(self, seq: Sequence) -> list[Sequence]:
        """seq's prefill is done: its followers copy the state and decode from here."""
        started = []
        for f in seq.followers:
            if f.status is not Status.WAITING:
                continue  # aborted meanwhile
            self.state.copy(seq.row, f.row)
            f.computed, f.status = seq.computed, Status.RUNNING
            self.row_tokens[f.row] = []
            started.append(f)
        return started

    def _retire(self) -> list[Sequence]:
        done = self.scheduler.retire()
        for s in done:  # a freed row keeps its state: the next prompt that starts the same reuses it
            self.row_tokens[s.row] = s.tokens[:min(s.computed, self.state.lengths[s.row])]
        return done

    def _place(self, seq: Sequence, free: list[int]) -> int:
        """The row for a new sequence, and how much of its prompt is already there (prefix cache)."""
        limit = len(seq.prompt) - 1  # at least one prompt token runs, to give the first logits

        def shared(tokens: list[int]) -> int:
            n = 0
            for a, b in zip(tokens, seq.prompt[:limit]):
                if a != b:
                    break
                n += 1
            return n

        best, best_n = min(free, key=lambda r: len(self.row_tokens[r])), 0  # default: the emptiest row
        if self.cfg.prefix_cache:
            # a recurrent layer rewinds only to recent positions: a prefix it cannot reach is no prefix
            for r in free:
                if (n := shared(self.row_tokens[r])) > best_n and self.state.can_truncate(r, n):
                    best, best_n = r, n
            donor, donor_n = None, best_n
            for other in self.scheduler.running:
                if other.row is not None and (n := shared(other.tokens[:other.computed])) > max(donor_n, self.cfg.min_prefix - 1) \
                        and self.state.can_truncate(other.row, n):
                    donor, donor_n = other, n
            if donor is not None:  # copy the prefix from a running row into the emptiest free row
                best = min(free, key=lambda r: len(self.row_tokens[r]))
                self.state.copy(donor.row, best)
                best_n = donor_n
        if best_n:
            self.state.truncate(best, best_n)
        else:
            self.state.free(best)
        seq.computed = seq.cached_tokens = best_n
        self.row_tokens[best] = []
        return best

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.has_work():
            self.step()

    def generate(self, prompts: Iterable[str | list[int]], cfg: GenerationConfig = GenerationConfig(),
                 bos: bool | None = None) -> list[Sequence]:
        seqs = [self.add(p, cfg, bos=bos) for p in prompts]
        self.run()
        return seqs

    # --- sampling -----------------------------------------------------------------------------------

    def _sample_all(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of logits (B, V) and append it."""
        plain = all(s.cfg.temperature <= 0 and not s.processors and s.cfg.logprobs is None for s in seqs)
        tokens = kernels.argmax(logits) if plain else [self.sample(s, logits[i]) for i, s in enumerate(seqs)]
        for s, tok in zip(seqs, tokens):
            if s.first_token_at is None:
                s.first_token_at = time.perf_counter()
            if tok is None:
                s.finish("stop")
            else:
                s.append(tok)

    @staticmethod
    def sample(seq: Sequence, logits: torch.Tensor) -> int | None:
        """One token for `seq` from its next-token logits (V,): processors, log-probabilities, draw.
        None when the processors allow no token at all (a grammar that is complete): the sequence
        then ends with "stop"."""
        if seq.processors:
            logits = logits.clone()
            for p in seq.processors:
                logits = p(seq.tokens, len(seq.prompt), logits)
            if not bool(torch.isfinite(logits).any()):
                return None
        cfg = seq.cfg
        if cfg.temperature <= 0:
            tok = int(logits.argmax())
        else:
            probs = filtered_logits(logits[None].float(), cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=seq.generator))
        if cfg.logprobs is not None and tok not in seq.eos:  # the end token is not part of the text
            lp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(lp, cfg.logprobs) if cfg.logprobs else None
            seq.logprobs.append({"token": tok, "logprob": float(lp[tok]),
                                 "top": list(zip(top.indices.tolist(), top.values.tolist())) if top else []})
        return tok

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
        if n > len(self.scheduler.free_rows):
            raise ValueError(f"{n} forks need {n} free rows, {len(self.scheduler.free_rows)} are free")
        forks = []
        for i in range(n):
            c = seq.cfg if seq.cfg.seed is None else dataclasses.replace(seq.cfg, seed=seq.cfg.seed + 1 + i)
            f = Sequence(list(seq.prompt), c, list(processors() if processors else ()), seq.on_text)
            f.attach_stream(self.tokenizer, seq.eos)
            f.row, f.status = self.scheduler.free_rows.pop(), Status.RUNNING
            self.state.copy(seq.row, f.row)
            self.state.truncate(f.row, len(seq.prompt) - 1)
            f.computed = len(seq.prompt) - 1  # the last prompt token is pending: the next step samples
            self.scheduler.running.append(f)
            forks.append(f)
        return forks
