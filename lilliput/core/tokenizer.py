"""Tokenizers: BPE (SmolLM2's byte-level one, read from a GGUF or a Hugging Face folder; the
SentencePiece-style BPE with byte fallback of Llama 2 and Gemma GGUFs) and a byte tokenizer for tests.

Both classes share one interface: `encode`, `decode`, `apply_chat_template`, `save`, and the
attributes `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `add_bos`, `chat_template`, `eos_ids`.
`load_tokenizer(folder)` reads back whatever either `save` wrote.

    reader = gguf.GGUFReader(path)
    tok = Tokenizer.from_gguf(reader)          # ~0.15 s for SmolLM2's 49,152 tokens
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    stream = StreamDecoder(tok)
    for i in generated: print(stream.push(i), end="")
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers import AddedToken

from lilliput.core.gguf_vocab import (CONTROL, UNKNOWN, USER_DEFINED, byte_level_bpe, gguf_value,
                                      sentencepiece_bpe)

__all__ = [
    "ByteTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
]

# Special tokens that close a chat turn. A token from this list ends generation when it is a
# special token of the vocabulary and the chat template writes it (SmolLM2: `<|im_end|>`, which is
# also its eos). `<|endoftext|>` counts only where a template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


# A byte tokenizer has no chat format of its own: this plain one lets tests exercise chat paths.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


# --------------------------------------------------------------------------- chat templates


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    # Same environment as transformers' `_compile_jinja_template`: templates are untrusted code.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a Hugging Face chat template the way transformers' `apply_chat_template` does.

    `variables` are the special tokens (`bos_token`, `eos_token`, ...) and any extra keys a
    template reads; `tools` and `documents` default to None as in transformers.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(
            "messages must be a list of dicts like [{'role': 'user', 'content': 'hi'}], "
            f"got {type(messages).__name__}"
        )
    # Plain JSON data only reaches the sandbox; this also copies, so templates never edit inputs.
    messages = json.loads(json.dumps(messages))
    context = {"tools": None, "documents": None, **variables}
    return _compile_chat_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **context
    )


# --------------------------------------------------------------------------- tokenizers


class _Decodes(Protocol):
    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...


def _eos_ids(eos_id: int | None, chat_template: str | None, special: dict[str, int]) -> set[int]:
    ids = {eos_id} if eos_id is not None else set()
    for token in END_OF_TURN_TOKENS:
        if token in special and chat_template is not None and token in chat_template:
            ids.add(special[token])
    return ids


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as "..." or as {"content": "...", ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template_of(config: dict, folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"  # transformers >= 4.50 saves the template here
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


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



class Tokenizer:
    """A Hugging Face fast (Rust) tokenizer plus the facts generation needs.

    Attributes:
        vocab_size: ids are in [0, vocab_size), added tokens included.
        bos_id, eos_id, pad_id: special ids, or None when the tokenizer has none.
        add_bos: whether the tokenizer's own config prepends BOS when encoding.
        add_eos: whether it appends EOS (with `bos=None`: both follow the tokenizer's config).
        chat_template: the Jinja chat template, or None.
        eos_ids: ids that end generation: `eos_id` plus the end-of-turn special tokens of
            `END_OF_TURN_TOKENS` that the chat template writes.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        if add_eos and eos_id is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        self.chat_template = chat_template
        special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.eos_ids: set[int] = _eos_ids(eos_id, chat_template, special)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"add_bos={self.add_bos}, eos_ids={sorted(self.eos_ids)})"
        )

    # ---- text <-> ids

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Ids of `text`; special tokens written in it (`<|im_start|>`) map to their single ids.

        `bos=None` follows `self.add_bos`.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, bos)

    def encode_batch(self, texts: list[str], bos: bool | None = None) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside the Rust library."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, bos) for e in encodings]

    def _with_bos(self, ids: list[int], bos: bool | None) -> list[int]:
        if bos is None and self.add_eos:
            ids = [*ids, self.eos_id]
        if not (self.add_bos if bos is None else bos):
            return ids
        if self.bos_id is None:
            raise ValueError("bos=True but this tokenizer has no BOS token; pass bos=False")
        return [self.bos_id, *ids]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor/array of ints)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def special_tokens(self) -> dict[str, Any]:
        """The special tokens' strings, the variables chat templates read."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        names["unk_token"] = self.unk_id
        return {k: self.backend.id_to_token(v) for k, v in names.items() if v is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text the model was fine-tuned on."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template; encode a plain prompt instead, or use "
                "a tokenizer folder whose tokenizer_config.json has a chat_template"
            )
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt, **self.special_tokens
        )

    # ---- files

    def save(self, folder: str | Path) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` (Hugging Face layout).

        transformers' `AutoTokenizer.from_pretrained(folder)` loads the result.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            # The generic fast class keeps tokenizer.json as it is (a model-specific class may
            # rebuild the pre-tokenizer from its own defaults).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            **self.special_tokens,
            "chat_template": self.chat_template,
        }
        config = {k: v for k, v in config.items() if v is not None}
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
        return folder

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json + tokenizer_config.json
        (+ special_tokens_map.json, chat_template.jinja when present)."""
        folder = Path(path)
        if not (folder / "tokenizer.json").exists():
            hint = (
                " (it holds a byte tokenizer: use load_tokenizer(folder))"
                if (folder / BYTE_TOKENIZER_FILE).exists()
                else "; point at a Hugging Face model folder that has one"
            )
            raise FileNotFoundError(f"no tokenizer.json in {folder}{hint}")
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")

        def special_id(name: str) -> int | None:
            token = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if token is None:
                return None
            i = backend.token_to_id(token)
            if i is None:
                raise ValueError(f"{name} {token!r} of {folder} is not in its tokenizer.json")
            return i

        bos_id = special_id("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: ask the post-processor whether it prepends BOS
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and probe[:1] == [bos_id]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=special_id("eos_token"),
            pad_id=special_id("pad_token"),
            unk_id=special_id("unk_token"),
            add_bos=bool(add_bos),
            add_eos=bool(config.get("add_eos_token")) and special_id("eos_token") is not None,
            chat_template=_chat_template_of(config, folder),
        )

    @classmethod
    def train_bpe(cls, texts: list[str], vocab_size: int) -> Tokenizer:
        """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) of `vocab_size` tokens learnt
        from `texts`, with no special tokens: for models trained from scratch on those texts."""
        if vocab_size <= 256:
            raise ValueError(f"vocab_size must exceed the 256 bytes of the alphabet, got {vocab_size}")
        backend = tokenizers.Tokenizer(tokenizers.models.BPE())
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                 initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (`reader` is a `gguf.GGUFReader` or the
        metadata dict of `lilliput.core.gguf_file.GGUFFile`).

        Supports byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with the pre-tokenizers of
        `core.gguf_vocab.GGUF_PRE_TOKENIZERS`, and SentencePiece (`"llama"`: Llama 2, Gemma), which llama.cpp
        tokenizes by merging the adjacent pair whose result has the highest score, with byte
        fallback: a BPE whose merges are ranked by those scores. Control tokens (type 3) become
        special added tokens and user-defined ones (type 4) plain added tokens, so both stay whole
        when written in text.
        """
        model = gguf_value(reader, "tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"GGUF tokenizer.ggml.model={model!r} is not supported (byte-level BPE 'gpt2' and "
                "SentencePiece 'llama' are); load the model's Hugging Face folder with "
                "Tokenizer.from_folder instead"
            )
        tokens: list[str] = gguf_value(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF has no tokenizer.ggml.tokens: no tokenizer in it")
        types: list[int] = gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF tokenizer.ggml.tokens repeats tokens: not a BPE vocabulary")

        def token_id(key: str) -> int | None:
            value = gguf_value(reader, f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        specials = (CONTROL,)
        if model == "gpt2":
            backend = byte_level_bpe(reader, vocab)
        else:
            backend = sentencepiece_bpe(reader, tokens, types, vocab, token_id("unknown_token_id"))
            specials = (CONTROL, UNKNOWN)  # llama.cpp matches <unk> in text too
        control = [t for t, k in zip(tokens, types) if k in specials]
        user = [t for t, k in zip(tokens, types) if k == USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError("GGUF added tokens grew the vocabulary: token list inconsistent")
        eos_id = token_id("eos_token_id")
        # llama.cpp's keys; missing means BOS for SentencePiece (llama.cpp's default) and none for
        # byte-level BPE (as transformers reads it), and never EOS
        return cls(
            backend,
            bos_id=token_id("bos_token_id"),
            eos_id=eos_id,
            pad_id=token_id("padding_token_id"),
            unk_id=token_id("unknown_token_id"),
            add_bos=bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
            add_eos=bool(gguf_value(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None,
            chat_template=gguf_value(reader, "tokenizer.chat_template"),
        )


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the tokenizer") from e


class ByteTokenizer:
    """Ids are UTF-8 byte values: a 256-token vocabulary for tiny test models.

    No BOS/EOS/pad, so `eos_ids` is empty and generation stops at its token budget.
    """

    vocab_size: int = 256
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False

    def __init__(self, chat_template: str | None = BYTE_CHAT_TEMPLATE):
        self.chat_template = chat_template
        self.eos_ids: set[int] = set()

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        if bos:
            raise ValueError("bos=True but ByteTokenizer has no BOS token; pass bos=False")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], bos: bool | None = None) -> list[list[int]]:
        return [self.encode(t, bos) for t in texts]

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer ids must be in [0, 256), got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this ByteTokenizer has no chat template; encode a plain prompt")
        return render_chat_template(self.chat_template, messages, add_generation_prompt)

    def save(self, folder: str | Path) -> Path:
        """Write `byte_tokenizer.json`, which `load_tokenizer(folder)` reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"type": "byte", "vocab_size": 256, "chat_template": self.chat_template}
        text = json.dumps(record, indent=2) + "\n"
        (folder / BYTE_TOKENIZER_FILE).write_text(text, encoding="utf-8")
        return folder

    @classmethod
    def from_folder(cls, path: str | Path) -> ByteTokenizer:
        file = Path(path) / BYTE_TOKENIZER_FILE
        if not file.exists():
            raise FileNotFoundError(
                f"no {BYTE_TOKENIZER_FILE} in {path}; write one with ByteTokenizer().save(folder)"
            )
        record = _read_json(file)
        if record.get("type") != "byte":
            raise ValueError(f"{file} is not a byte tokenizer record (type={record.get('type')!r})")
        return cls(chat_template=record.get("chat_template"))


def load_tokenizer(folder: str | Path) -> Tokenizer | ByteTokenizer:
    """The tokenizer saved in `folder`: a Hugging Face tokenizer.json or a byte tokenizer."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_folder(folder)
    if (folder / BYTE_TOKENIZER_FILE).exists():
        return ByteTokenizer.from_folder(folder)
    raise FileNotFoundError(
        f"no tokenizer in {folder}: expected tokenizer.json (Hugging Face) or "
        f"{BYTE_TOKENIZER_FILE}; "
        "save one with tokenizer.save(folder)"
    )


class StreamDecoder:
    """Turns ids arriving one at a time into text increments, never splitting a character.

    A character cut across tokens decodes to a trailing U+FFFD; that tail is held back until the
    next token completes it. Only a short window of ids is re-decoded per step (the
    prefix/read-offset scheme of text-generation-inference), so streaming stays O(n).

        stream = StreamDecoder(tok)
        text = "".join(stream.push(i) for i in ids) + stream.flush()   # == tok.decode(ids)
    """

    def __init__(self, tokenizer: _Decodes, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoded again for context (leading-space rules)
        self._read = 0  # ids before this are emitted

    def push(self, ids: int | list[int]) -> str:
        """Add one id (or several) and return the text that became final."""
        self.ids.extend([int(ids)] if isinstance(ids, int) else [int(i) for i in ids])
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The held-back tail (an incomplete character decodes to U+FFFD), then reset."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self.ids, self._prefix, self._read = [], 0, 0
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""
