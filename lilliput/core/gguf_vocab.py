"""Tokenizers as GGUF describes them (`tokenizer.ggml.*`), as Hugging Face `tokenizers` backends that
tokenize as llama.cpp does: byte-level BPE (model "gpt2") with its pre-tokenizer named by
`tokenizer.ggml.pre`, and SentencePiece (model "llama": Llama 2, Gemma).

`core.tokenizer.Tokenizer.from_gguf` wraps these backends; `export.vocab` writes the same keys.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regex of Llama 3 style BPE vocabularies (llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3), as
# their tokenizer.json spells it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's (LLAMA_VOCAB_PRE_TYPE_QWEN2): Llama 3's with digits one by one.
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _digits_then_gpt2(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    # llama.cpp: regexes "\p{N}" then the GPT-2 regex; HF (SmolLM2's and StarCoder's
    # tokenizer.json): Digits(individual_digits=True) then ByteLevel(use_regex=True). Same split.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
        ]
    )


def _gpt2(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)


def _split_then_bytes(regex: str):
    def build(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )

    return build


_llama3 = _split_then_bytes(LLAMA3_SPLIT)
_qwen2 = _split_then_bytes(QWEN2_SPLIT)


# `tokenizer.ggml.pre` -> pre-tokenizer builder, grouped as llama.cpp's llama-vocab.cpp groups them.
# "default" (and a missing key) is read as plain GPT-2, as transformers' GGUF reader does.
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _digits_then_gpt2,
    ),
    # "gpt2" is what lilliput wrote before it used llama.cpp's own name, "gpt-2"
    **dict.fromkeys(("gpt-2", "gpt2", "default", "mpt", "olmo", "jais", "phi-2"), _gpt2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _llama3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _qwen2),
}


def byte_level_bpe(reader, vocab: dict[str, int]) -> tokenizers.Tokenizer:
    pre = gguf_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: "
            f"{sorted(GGUF_PRE_TOKENIZERS)}. Load the model's Hugging Face folder with "
            "Tokenizer.from_folder instead"
        )
    merges: list[str] = gguf_value(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("GGUF has no tokenizer.ggml.merges: no BPE tokenizer in it")
    # The GGUF spells byte-level tokens exactly as tokenizer.json does ("Ġthe"): use verbatim.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    prefix = bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", False))
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre](prefix)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def sentencepiece_bpe(reader, tokens: list[str], types: list[int], vocab: dict[str, int],
                       unk_id: int | None) -> tokenizers.Tokenizer:
    """llama.cpp's SentencePiece tokenizer as a BPE: spaces become "▁" (and one is prepended when
    `add_space_prefix`), pairs merge by the score of their result, unknown characters become
    their <0xNN> byte tokens."""
    scores: list[float] | None = gguf_value(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    merges = []  # (-score of the result, result id, left id, right id)
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL:
            continue
        for cut in range(1, len(t)):
            left, right = vocab.get(t[:cut]), vocab.get(t[cut:])
            if left is not None and right is not None:
                merges.append((-scores[i], i, left, right))
    merges.sort()
    pairs = [(tokens[a], tokens[b]) for _, _, a, b in merges]
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, byte_fallback=True, unk_token=unk,
                                              fuse_unk=True))
    prefix = bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return backend


def gguf_value(reader, key: str, default: Any = None) -> Any:
    """Metadata value `key` of a gguf.GGUFReader or of GGUFFile.metadata (a dict)."""
    if isinstance(reader, dict):  # GGUFFile.metadata: already plain Python values
        return reader.get(key, default)
    # ReaderField.contents() slices the memory map once per array: ~35 ms for 49k strings.
    field = reader.fields.get(key)
    return default if field is None else field.contents()
