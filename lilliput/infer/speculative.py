"""Speculative decoding: a cheap drafter proposes k tokens, the model verifies them in one forward.

The target model's engine runs the k + 1 positions in one call (`Engine.verify`, which on CPU
reads every weight matrix once for all of them), then keeps the longest acceptable prefix and
one token of its own (`Engine.commit` rewinds the state past the rest):

- greedy (temperature 0): a drafted token is accepted while it equals the target's argmax, so
  the output is token for token what the target alone produces;
- sampling: draft token d with draft probability q(d) is accepted with probability
  min(1, p(d) / q(d)); at the first rejection the token is drawn from max(0, p - q),
  normalised; after k acceptances a bonus token comes from p. The output then follows the
  target's distribution exactly (Leviathan et al. 2023, Chen et al. 2023). A deterministic
  drafter (prompt lookup) has q one-hot at its token.

Drafters (`Drafter`): `PromptLookup` finds the last n-gram earlier in the prompt and output and
proposes what followed it (no model; pays on input-grounded tasks); `DraftModel` runs a smaller
model with the same tokenizer (a quantized or structurally pruned copy of the target).

`k` adapts: the decoder keeps the running acceptance rate and the measured cost of drafting and
verifying, picks the k with the best expected tokens per second, and decodes plainly when no k
beats it, so a bad drafter costs little (a draft model's cost is first measured on one drafted token,
prompt lookup's on k). A draft model reads the prompt with the target (before the
first token: prefill, as the target's own), and while decoding is plain it is left behind; a retry
first catches it up in one chunk, so the decoder retries only when the tokens it expects to gain over
the next stretch pay for that catch-up, and waits twice as long after each retry that did not pay.

Speculation runs one sequence at a time (batch 1): in a batch, the engine's plain batched
decode is what gains, and `SpeculativeDecoder` refuses an engine with other work in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lilliput.core.model import GPT
from lilliput.infer.engine import Engine
from lilliput.infer.runner import ModelRunner
from lilliput.infer.sampler import draw, probabilities, process, record
from lilliput.infer.sequence import GenerationConfig, Sequence, Status, common_prefix


class Drafter:
    """Proposes up to k next tokens for a sequence; `probs` are the draft distributions (k, V) the
    tokens were drawn from, or None when the drafter is deterministic (one-hot)."""

    name = "drafter"
    free = False
    """Whether proposing costs next to nothing beside a target step (no model). An adaptive decoder's
    first verification drafts its configured k with a free drafter, and one token otherwise: a model's
    cost is unknown until measured, and one drafted token is the cheapest measure of it."""

    def propose(self, seq: Sequence, k: int) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def behind(self, seq: Sequence) -> int:
        """Tokens of seq the drafter has yet to read before it can propose (`sync` reads them)."""
        return 0

    def sync(self, seq: Sequence) -> None:
        """Read what `behind` counts, now (a draft model's prefill chunk)."""

    def commit(self, seq: Sequence) -> None:
        """The sequence's tokens changed (accepted drafts, a correction): resynchronise."""

    def release(self, seq: Sequence) -> None:
        """The sequence is done."""


class PromptLookup(Drafter):
    """Prompt-lookup decoding: match the last n tokens (n = max_ngram down to min_ngram) against
    the prompt and output so far, most recent match first, and propose the k tokens after it.

    Each sequence's n-grams are indexed as its tokens come (where each starts), so a proposal costs
    a few dictionary lookups, not a scan of the whole sequence (~0.3 ms at 500 tokens: 4% of an
    int8 step)."""

    name = "lookup"
    free = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._index: dict[int, tuple[list[int], dict[tuple[int, ...], list[int]]]] = {}  # id(seq) -> (tokens, starts)

    def _starts(self, seq: Sequence) -> dict[tuple[int, ...], list[int]]:
        """n-gram -> where it starts in seq.tokens (ascending), for every n in range; extended to the
        tokens seq has now (rebuilt should they ever differ from what was indexed)."""
        ids = seq.tokens
        seen, starts = self._index.get(id(seq), ([], {}))
        if ids[:len(seen)] != seen:
            seen, starts = [], {}
        for end in range(len(seen) + 1, len(ids) + 1):  # n-grams ending at each new token
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                starts.setdefault(tuple(ids[end - n:end]), []).append(end - n)
        self._index[id(seq)] = (list(ids), starts)
        return starts

    def propose(self, seq: Sequence, k: int) -> tuple[list[int], None]:
        ids, starts = seq.tokens, self._starts(seq)
        L = len(ids)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            at = starts.get(tuple(ids[L - n:]), [])
            i = len(at) - 1
            while i >= 0 and at[i] > L - n - 1:  # the tail itself is no earlier occurrence
                i -= 1
            if i >= 0:
                return ids[at[i] + n:at[i] + n + k], None
        return [], None

    def release(self, seq: Sequence) -> None:
        self._index.pop(id(seq), None)


class DraftModel(Drafter):
    """A smaller model with the same tokenizer drafts k tokens, one step each, on a row of its own
    state per sequence (taken when the sequence is first seen: before the target has placed it). A
    released row keeps what it read, and a new sequence takes the free row sharing the longest prefix
    with it: the draft's prefix cache, as the target engine keeps its own."""

    name = "draft"

    def __init__(self, model: GPT, engine: Engine):
        if model.config.vocab_size != engine.model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                             f"target's ({engine.model.config.vocab_size}): it must share the tokenizer")
        self.runner = ModelRunner(model, engine.cfg.max_batch, min(engine.max_len, 256))
        self.rows: dict[int, int] = {}  # id(seq) -> its row in the draft state, while the sequence runs
        self.known: dict[int, list[int]] = {}  # row -> tokens in the draft state (kept after release)

    def _row(self, seq: Sequence) -> int:
        if id(seq) not in self.rows:
            taken = set(self.rows.values())
            free = [r for r in range(self.runner.state.rows) if r not in taken]
            if not free:
                raise RuntimeError("the draft model has no free row: release finished sequences")
            self.rows[id(seq)] = max(free, key=lambda r: common_prefix(self.known.get(r, []), seq.tokens[:-1]))
        return self.rows[id(seq)]

    def _shared(self, seq: Sequence) -> int:
        """Length of the prefix the draft row shares with seq's tokens but the last."""
        return common_prefix(self.known.get(self._row(seq), []), seq.tokens[:-1])

    def behind(self, seq: Sequence) -> int:
        return len(seq.tokens) - 1 - self._shared(seq)

    def sync(self, seq: Sequence) -> None:
        """Rewind the draft row to the longest prefix it shares with seq, then feed the rest but the last."""
        state, row, n = self.runner.state, self._row(seq), self._shared(seq)
        want = seq.tokens[:-1]
        if n < state.lengths[row]:
            state.truncate(row, n) if n else state.free(row)
        self.known[row] = want[:n]  # what the state holds, should the extend fail
        if len(want) > n:
            self.runner.extend(row, want[n:], "none")
        self.known[row] = list(want)

    def propose(self, seq: Sequence, k: int) -> tuple[list[int], torch.Tensor | None]:
        self.sync(seq)
        cfg, row = seq.cfg, self._row(seq)
        tok, out, probs = seq.tokens[-1], [], []
        for _ in range(k):
            logits = self.runner.decode([tok], [row])[0]
            if cfg.temperature <= 0:
                tok = int(logits.argmax())
            else:
                p = probabilities(cfg, logits)
                tok = draw(seq, p)
                probs.append(p)
            out.append(tok)
        self.known[row] = seq.tokens + out[:-1]
        return out, (torch.stack(probs) if probs else None)

    def release(self, seq: Sequence) -> None:
        self.rows.pop(id(seq), None)  # the row keeps what it read, for the next sequence with that prefix


def make_drafter(spec: str, engine: Engine) -> Drafter:
    """`lookup`, or `draft:MODEL` (a .gguf file or model folder with the target's tokenizer)."""
    if spec == "lookup":
        return PromptLookup()
    if spec.startswith("draft:") and len(spec) > 6:
        from lilliput.core.checkpoint import load_model

        model, _ = load_model(spec[6:], device=engine.runner.device)
        return DraftModel(model, engine)
    raise ValueError(f"--speculate takes lookup or draft:MODEL, got {spec!r}")


@dataclass(frozen=True)
class SpeculationConfig:
    k: int = 4
    """Tokens drafted per verification (the starting value when adaptive)."""
    k_max: int = 8
    """Most tokens drafted per verification."""
    adaptive: bool = True
    """Choose k from the running acceptance rate and measured costs; decode plainly when no k pays."""
    retry_every: int = 32
    """While speculation is off, consider it again after this many plain tokens (twice as many after each
    retry that did not pay, up to 8 times as many)."""

    def __post_init__(self):
        if not 1 <= self.k <= self.k_max <= 15:
            raise ValueError(f"need 1 <= k <= k_max <= 15, got k={self.k}, k_max={self.k_max}")


@dataclass
class SpeculationStats:
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification produced on average (accepted drafts + the target's own)."""
        return (self.accepted + self.verifications) / self.verifications if self.verifications else 0.0

    def as_dict(self) -> dict:
        return {"verifications": self.verifications, "drafted": self.drafted, "accepted": self.accepted,
                "plain_steps": self.plain_steps, "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 3)}


class SpeculativeDecoder:
    def __init__(self, engine: Engine, drafter: Drafter, cfg: SpeculationConfig = SpeculationConfig()):
        self.engine, self.drafter, self.cfg = engine, drafter, cfg
        self.stats = SpeculationStats()
        self.alpha = 0.7  # running acceptance rate, optimistic start (a prior worth one verification)
        self._seen = 0  # verifications since the prior was set: the first ones weigh 1/2, 1/3, ..., then 0.1 (EMA)
        self.t_step: float | None = None  # seconds of a plain decode step (EMA)
        self.t_verify: dict[int, float] = {}  # k -> seconds of drafting + verifying k (EMA)
        self.t_catch_up: float | None = None  # seconds per token a drafter left behind takes to catch up (EMA)
        self.k = cfg.k
        self._off_for = 0
        self._backoff = 1  # the next plain stretch is retry_every x this

    # --- choosing k -----------------------------------------------------------------------------------

    def _expected_rate(self, k: int) -> float | None:
        """Expected tokens/s with k drafts: (1 - a^(k+1)) / (1 - a) tokens per draft + verify."""
        t = self.t_verify.get(k)
        if t is None and self.t_verify and self.t_step:  # unmeasured k: linear in k
            (k0, t0), (k1, t1) = min(self.t_verify.items()), max(self.t_verify.items())
            if k1 == k0:  # one measure: a plain step's cost, plus what it cost beyond that per drafted token
                k1, t1 = 0, min(self.t_step, t0)
            t = t0 + (t1 - t0) * (k - k0) / (k1 - k0)
        if t is None:
            return None
        a = min(self.alpha, 0.999)
        return (1 - a ** (k + 1)) / (1 - a) / t

    def _choose(self, behind: int = 0) -> int:
        """k for the next verification; 0 means decode plainly. `behind`: tokens the drafter must read
        first (after a plain stretch), a cost the gain over the next stretch must pay for."""
        if not self.cfg.adaptive:
            return self.cfg.k
        if self._off_for > 0:
            self._off_for -= 1
            return 0
        if self.t_step is None:
            return 0  # first measure a plain step
        if not self.t_verify:  # then one verification: cfg.k drafts where drafting is free, one otherwise
            return self.k if self.drafter.free else 1
        rates = {k: r for k in range(1, self.cfg.k_max + 1) if (r := self._expected_rate(k)) is not None}
        best = max(rates, key=rates.get)
        stretch = self.cfg.retry_every
        catch_up = behind * (self.t_catch_up if self.t_catch_up is not None else self.t_step)
        if catch_up + stretch / rates[best] >= stretch * self.t_step:  # does not pay now: plain for a while
            self._off_for = stretch * self._backoff
            self._backoff = min(2 * self._backoff, 8)
            self.alpha, self._seen = max(self.alpha, 0.5), 0  # the retry gets a fair chance, and a quick verdict
            return 0
        # explore one step beyond what was measured, so larger k gets a measured cost
        return min(best + 1, self.cfg.k_max) if best == max(self.t_verify) and best < self.cfg.k_max else best

    @staticmethod
    def _ema(old: float | None, new: float, w: float = 0.2) -> float:
        return new if old is None else (1 - w) * old + w * new

    # --- decoding ----------------------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], cfg: GenerationConfig = GenerationConfig(),
                 bos: bool | None = None) -> Sequence:
        engine = self.engine
        if engine.has_work():
            raise ValueError("speculative decoding runs one sequence at a time: the engine has other work")
        seq = engine.add(prompt, cfg, bos=bos)
        t = time.perf_counter()
        self.drafter.sync(seq)  # a draft model reads the prompt with the target: prefill, before the first token
        if len(seq.tokens) > 1:
            self.t_catch_up = self._ema(self.t_catch_up, (time.perf_counter() - t) / (len(seq.tokens) - 1))
        try:
            while not seq.finished and seq.status is not Status.RUNNING:
                engine.step()  # prefill (and the first token)
            plain_run = 0  # plain steps since the last verification: what a draft model has not read
            while not seq.finished:
                behind = self.drafter.behind(seq) if plain_run and self._off_for == 0 else 0
                k = min(self._choose(behind), cfg.max_new_tokens - len(seq.output),
                        engine.max_len - len(seq.tokens) - 1)
                if k <= 0:
                    t = time.perf_counter()
                    engine.step()
                    self.t_step = self._ema(self.t_step, time.perf_counter() - t)
                    self.stats.plain_steps += 1
                    plain_run += 1
                    continue
                if behind > 1:  # caught up in one chunk, timed apart from the steady cost of drafting
                    t = time.perf_counter()
                    self.drafter.sync(seq)
                    self.t_catch_up = self._ema(self.t_catch_up, (time.perf_counter() - t) / behind)
                plain_run = 0
                t = time.perf_counter()  # drafting is part of a speculative step's cost (a draft model's k steps)
                draft, q = self.drafter.propose(seq, k)
                if not draft:
                    engine.step()
                    self.t_step = self._ema(self.t_step, time.perf_counter() - t)
                    self.stats.plain_steps += 1
                    plain_run += 1
                    continue
                logits = engine.verify(seq, draft)  # (k+1, V)
                new = self._accept(seq, draft, q, logits)
                engine.commit(seq, new)
                self.drafter.commit(seq)
                k, seconds = len(draft), time.perf_counter() - t
                self.t_verify[k] = self._ema(self.t_verify.get(k), seconds)
                if self.t_step is not None and len(new) / seconds >= 1.0 / self.t_step:
                    self._backoff = 1  # this one paid
                self.stats.verifications += 1
                self.stats.drafted += k
                self.stats.accepted += len(new) - 1
                self.alpha = self._ema(self.alpha, (len(new) - 1) / k, max(0.1, 1 / (self._seen + 2)))
                self._seen += 1
        finally:
            self.drafter.release(seq)  # its draft row is free again, whatever happened
        engine.step()  # retire it
        self.stats.tokens += len(seq.output)
        return seq

    def _accept(self, seq: Sequence, draft: list[int], q: torch.Tensor | None, logits: torch.Tensor) -> list[int]:
        """The tokens this verification yields: accepted drafts, then the target's own token."""
        cfg, ids, out = seq.cfg, list(seq.tokens), []
        for i in range(len(draft) + 1):
            row = process(seq, ids, logits[i])
            last = i == len(draft)
            if cfg.temperature <= 0:
                tok = int(row.argmax())
                stop = last or tok != draft[i]
            else:
                p = probabilities(cfg, row)
                if last:
                    tok, stop = draw(seq, p), True
                else:
                    d = draft[i]
                    qd = q[i] if q is not None else torch.zeros_like(p).index_fill_(0, torch.tensor([d]), 1.0)
                    u = float(torch.rand((), generator=seq.generator))
                    if u * float(qd[d]) <= float(p[d]):  # accept with probability min(1, p/q)
                        tok, stop = d, False
                    else:
                        residual = (p - qd).clamp(min=0)
                        total = float(residual.sum())
                        tok, stop = draw(seq, residual / total if total > 0 else p), True
            record(seq, row, tok)
            out.append(tok)
            ids.append(tok)
            if stop:
                return out
        return out
