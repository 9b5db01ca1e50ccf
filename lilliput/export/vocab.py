"""Tokenizers as the export formats spell them: a Hugging Face `tokenizer.json` for folders, and
GGUF's `tokenizer.ggml.*` arrays (tokens, token types, merges, pre-tokenizer name) for llama.cpp.

A `ByteTokenizer` (test models) becomes the byte-level BPE it is: 256 tokens, no merges, id = byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from lilliput.core.tokenizer import ByteTokenizer, Tokenizer

# llama.cpp's llama_token_type (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


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
    """llama.cpp's `tokenizer.ggml.pre` name for the tokenizer's split rules."""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM2 / StarCoder: single digits, then the GPT-2 regex
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Split", "ByteLevel"] and "p{N}{1,3}" in json.dumps(parts[0]):
        return "llama-bpe"
    raise ValueError(f"the tokenizer's pre-tokenizer {kinds} has no llama.cpp name lilliput knows; "
                     "export a Hugging Face folder instead (--format hf)")


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer.ggml.* arrays of a byte-level BPE tokenizer."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Tokens by id, padded with `[PADn]` up to the model's vocab_size as llama.cpp's converter does."""
    if isinstance(tokenizer, ByteTokenizer):
        raise ValueError("GGUF needs BPE merges (llama.cpp refuses a vocabulary without them) and this model has "
                         "a byte tokenizer: export it with --format hf or --format onnx")
    tok = as_bpe(tokenizer)
    spec = json.loads(tok.backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers, not {spec.get('model', {}).get('type')}")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"the tokenizer's {len(vocab)} ids are not 0..{vocab_size - 1}: it does not fit the model")
    added = tok.backend.get_added_tokens_decoder()
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [(CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL for i in range(len(tokens))]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise ValueError("the tokenizer has no BPE merges, which llama.cpp requires: export with --format hf or onnx")
    return GGUFVocab(pre_tokenizer_name(tok.backend), tokens, types, merges)
