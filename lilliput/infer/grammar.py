"""Structured output: a logits processor that lets through only tokens a grammar allows.

Built on llguidance (the grammar engine of llama.cpp, and a backend of vLLM and SGLang), chosen
for CPU serving: it computes each step's token mask lazily from a token trie in Rust (tens of
microseconds for JSON on a 49k vocabulary), with no per-schema precompilation over the whole
vocabulary as xgrammar and outlines-core do, so a new schema per request costs ~nothing and the
mask cost stays flat. JSON Schema and `{"type": "json_object"}` (any JSON object) compile to its
grammars; whitespace between tokens is fixed (", " and ": "), because a small model left free
to emit whitespace may emit nothing else.

    grammar = JsonGrammar.from_schema(tokenizer, schema, vocab_size)  # raises ValueError if bad
    engine.add(prompt, cfg, processors=[grammar.processor()])          # one per sample

Ending: once the grammar is complete only end-of-sequence tokens are allowed, so the tokenizer
must have one.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from lilliput.infer.sampling import LogitsProcessor

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


def read_schema(path: str) -> dict:
    """A JSON schema file, with one clear line when it is missing or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"JSON schema file {path!r} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{path} holds a JSON {type(schema).__name__}, not a schema object")
    return schema


class _ByteVocab:
    """What llguidance's TokenizerWrapper reads, for a byte-level tokenizer (tests, tiny models)."""

    def __init__(self, eos: int):
        self.eos_token_id, self.bos_token_id = eos, None
        self.tokens = [bytes([i]) for i in range(256)]
        self.special_token_ids = [eos]

    def __call__(self, s: bytes) -> list[int]:
        return list(s)


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer, vocab_size: int):
    import llguidance

    eos = sorted(getattr(tokenizer, "eos_ids", None) or ({tokenizer.eos_id} - {None}))
    if not eos:
        raise ValueError("constrained decoding needs a tokenizer with an end-of-sequence token")
    if hasattr(tokenizer, "backend"):  # a Hugging Face fast tokenizer
        return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocab(eos[0])), n_vocab=vocab_size)


class JsonGrammar:
    """A compiled grammar for one request; `processor()` makes one matcher per sample."""

    def __init__(self, ll_tokenizer, grammar: str, vocab_size: int):
        import llguidance

        self.ll_tokenizer, self.grammar, self.vocab_size = ll_tokenizer, grammar, vocab_size
        bad, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
        if bad:
            raise ValueError(f"the JSON schema cannot be used for constrained decoding: {msgs[0]}")

    @classmethod
    def from_schema(cls, tokenizer, schema: dict | None, vocab_size: int) -> "JsonGrammar":
        """`schema` None means any JSON object (OpenAI's `{"type": "json_object"}`)."""
        import llguidance

        if schema is not None and not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema or ANY_OBJECT),
                                                                     defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid: {e}") from None
        return cls(_ll_tokenizer(tokenizer, vocab_size), grammar, vocab_size)

    def processor(self) -> "GrammarProcessor":
        import llguidance

        return GrammarProcessor(llguidance.LLMatcher(self.ll_tokenizer, self.grammar), self.vocab_size)


class GrammarProcessor(LogitsProcessor):
    """Masks one sequence's logits to the tokens its grammar allows next. It feeds the matcher
    the output tokens sampled since its last call (the engine appends them after sampling)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.seen = matcher, 0
        self.words = (vocab_size + 31) // 32
        self.mask = torch.full((self.words,), -1, dtype=torch.int32)
        self.shifts = torch.arange(32, dtype=torch.int32)

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        out = ids[prompt_len:]
        for t in out[self.seen:]:
            self.matcher.consume_token(t)
        self.seen = len(out)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.words * 4)
        allowed = ((self.mask[:, None] >> self.shifts) & 1).flatten()[:logits.shape[-1]].bool()  # (V,)
        return logits.masked_fill_(~allowed, float("-inf"))
