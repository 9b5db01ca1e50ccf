"""Tokenizers as the export formats spell them: a Hugging Face `tokenizer.json` for folders, and
GGUF's `tokenizer.ggml.*` arrays for llama.cpp: a byte-level BPE as model `gpt2` (tokens, token types,
merges, pre-tokenizer name), a SentencePiece-style BPE with byte fallback (Llama 2, Gemma) as model
`llama` (tokens, scores, token types, space prefix), which llama.cpp tokenizes by merging the adjacent
pair whose result scores highest: each token's score is minus the rank of the merge that makes it.

A `ByteTokenizer` (test models) becomes the byte-level BPE it is: 256 tokens, no merges, id = byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from lilliput.core.gguf_vocab import (BYTE, CONTROL, LLAMA3_SPLIT, NORMAL, QWEN2_SPLIT, UNKNOWN, UNUSED,
                                      USER_DEFINED)
from lilliput.core.tokenizer import ByteTokenizer, Tokenizer, bytes_to_unicode

_BYTE = re.compile(r"<0x[0-9A-F]{2}>")



def as_bpe(tokenizer) -> Tokenizer:
    """A lilliput `Tokenizer` (returned as is) or a `ByteTokenizer` as the equivalent byte-level BPE."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return Tokenizer(backend, chat_template=tokenizer.chat_template)
    raise ValueError(f"cannot export a {type(tokenizer).__name__}: pass a lilliput Tokenizer or ByteTokenizer")


def pre_tokenizer_name(backend: tokenizers.Tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE's split rules."""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM2 / StarCoder: single digits, then the GPT-2 regex
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        for name, split in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if regex == split:
                return name
    raise ValueError(f"the tokenizer's pre-tokenizer {kinds} has no llama.cpp name lilliput knows; "
                     "export a Hugging Face folder instead (--format hf)")


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer.ggml.* values of a tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)  # gpt2
    scores: list[float] = field(default_factory=list)  # llama
    add_space_prefix: bool = False  # llama

    def write(self, w) -> None:
        """Add the tokenizer.ggml.* keys to a gguf.GGUFWriter."""
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.model == "gpt2":
            w.add_token_merges(self.merges)
        else:
            w.add_token_scores(self.scores)
            w.add_add_space_prefix(self.add_space_prefix)


def _tokens_and_types(tok: Tokenizer, vocab_size: int, unk: str | None = None) -> tuple[list[str], list[int]]:
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"the tokenizer's {len(vocab)} ids are not 0..{vocab_size - 1}: it does not fit the model")
    added = tok.backend.get_added_tokens_decoder()
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [(CONTROL if added[i].special else USER_DEFINED) if i in added else
             UNKNOWN if t == unk else BYTE if _BYTE.fullmatch(t) else NORMAL for i, t in enumerate(tokens)]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    return tokens, types


def _is_sentencepiece(spec: dict) -> bool:
    return spec["model"].get("type") == "BPE" and bool(spec["model"].get("byte_fallback"))


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer writes "▁" before the text (a Prepend normalizer or a Metaspace that prepends)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Tokens by id, padded with `[PADn]` up to the model's vocab_size as llama.cpp's converter does."""
    if isinstance(tokenizer, ByteTokenizer):
        raise ValueError("GGUF needs BPE merges (llama.cpp refuses a vocabulary without them) and this model has "
                         "a byte tokenizer: export it with --format hf or --format onnx")
    tok = as_bpe(tokenizer)
    spec = json.loads(tok.backend.to_str())
    kind = spec.get("model", {}).get("type")
    if kind != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers (byte-level, or SentencePiece-style with byte "
                         f"fallback), not {kind}: llama.cpp would tokenize a {kind} model differently")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise ValueError("the tokenizer has no BPE merges, which llama.cpp requires: export with --format hf or onnx")
    if not _is_sentencepiece(spec):
        tokens, types = _tokens_and_types(tok, vocab_size)
        return GGUFVocab("gpt2", pre_tokenizer_name(tok.backend), tokens, types, merges=merges)
    tokens, types = _tokens_and_types(tok, vocab_size, spec["model"].get("unk_token"))
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    floor = -float(len(merges) + 1)  # a token no merge makes is never a merge's result
    scores = [-float(rank[t]) - 1.0 if t in rank and types[i] == NORMAL else floor for i, t in enumerate(tokens)]
    return GGUFVocab("llama", None, tokens, types, scores=scores, add_space_prefix=_space_prefix(spec))
