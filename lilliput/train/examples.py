"""Fine-tuning examples: chat conversations and plain text as token ids with a loss mask.

Input files (`read_records`):
- JSON lines, one object a line: {"messages": [{"role", "content"}, ...]} (a conversation,
  rendered with the tokenizer's chat template; loss on the assistant turns only) or
  {"text": "..."} (plain text, loss on every token);
- a .txt file: one plain text;
- a folder: every *.jsonl and *.txt in it (sorted, recursively).

An `Example` is token ids and a mask of the tokens that are targets. Long examples are cut into
chunks of at most seq_len + 1 tokens; `ExampleBatches(index)` draws batch_size chunks (a pure
function of seed and index, as `WindowBatches`) and right-pads them: {"idx": (B, T+1), "mask":
(B, T) True where token t+1 is a target, "tokens": the unpadded tokens}. `LanguageModeling`
reads the mask, so the loss is the cross-entropy on targets only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    ids: list[int]
    """Token ids."""
    mask: list[bool]
    """mask[i]: token i is a target (predicted from the tokens before it)."""


# --- files -> records ---------------------------------------------------------------------------------

def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs a role in {ROLES} and a string content, got {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if isinstance(obj, dict) and "messages" in obj:
            records.append({"messages": _check_messages(obj["messages"], where)})
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            records.append({"text": obj["text"]})
        else:
            raise ValueError(f'{where}: expected {{"messages": [...]}} or {{"text": "..."}}')
    return records


def read_records(path: Path | str) -> list[dict]:
    """{"messages": [...]} and {"text": ...} records from a .jsonl or .txt file or a folder of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt") and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no .jsonl or .txt files")
    elif path.is_file():
        if path.suffix not in (".jsonl", ".txt"):
            raise ValueError(f"{path}: pass a .jsonl file (chat messages or text), a .txt file or a folder of them")
        files = [path]
    else:
        raise FileNotFoundError(f"training data {str(path)!r} not found")
    records = []
    for f in files:
        try:
            if f.suffix == ".jsonl":
                records += _read_jsonl(f)
            else:
                records.append({"text": f.read_text(encoding="utf-8")})
        except UnicodeDecodeError:
            raise ValueError(f"{f} is not UTF-8 text") from None
    records = [r for r in records if "messages" in r or r["text"].strip()]
    if not records:
        raise ValueError(f"{path} holds no examples (only empty texts)")
    return records


# --- records -> examples ------------------------------------------------------------------------------

def text_example(tokenizer, text: str) -> Example:
    """Plain text (then EOS when the tokenizer has one): every token is a target."""
    ids = tokenizer.encode(text, bos=None) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    return Example(ids, [True] * len(ids))


def chat_example(tokenizer, messages: list[dict]) -> Example:
    """A conversation in the chat template; targets are the assistant turns (with their end-of-turn
    tokens). Each turn's span is found by rendering the conversation up to it, and the pieces are
    tokenized apart, so the mask follows the template exactly."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        end = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(end) and end.startswith(start)):
            raise ValueError("the chat template renders a conversation's beginning differently from the whole: "
                             "cannot tell the assistant's tokens; use {\"text\": ...} records instead")
        spans.append((len(start), len(end)))
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for a, b in spans + [(len(full), len(full))]:
        for piece, target in ((full[pos:a], False), (full[a:b], True)):
            if piece:
                new = tokenizer.encode(piece, bos=None if not ids else False)
                ids += new
                mask += [target] * len(new)
        pos = b
    return Example(ids, mask)


def make_examples(tokenizer, records: list[dict]) -> list[Example]:
    return [chat_example(tokenizer, r["messages"]) if "messages" in r else text_example(tokenizer, r["text"])
            for r in records]


# --- batches ------------------------------------------------------------------------------------------

class ExampleBatches:
    """Random chunks of examples, padded: batch `index` is a pure function of (seed, index)."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.chunks = []  # (ids, mask) of <= seq_len + 1 tokens with at least one target after the first
        for ex in examples:
            for s in range(0, max(1, len(ex.ids) - 1), seq_len):
                ids, mask = ex.ids[s:s + seq_len + 1], ex.mask[s:s + seq_len + 1]
                if len(ids) >= 2 and any(mask[1:]):
                    self.chunks.append((ids, mask))
        if not self.chunks:
            raise ValueError("the examples hold no token to learn from (each needs 2 tokens and a target)")
        self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id

    def __call__(self, index: int) -> dict[str, torch.Tensor | int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        picks = torch.randint(0, len(self.chunks), (self.batch_size,), generator=g).tolist()
        T = max(len(self.chunks[i][0]) for i in picks)
        idx = torch.full((self.batch_size, T), self.pad_id, dtype=torch.long)
        target = torch.zeros(self.batch_size, T, dtype=torch.bool)
        for row, i in enumerate(picks):
            ids, mask = self.chunks[i]
            idx[row, :len(ids)] = torch.tensor(ids)
            target[row, :len(ids)] = torch.tensor(mask)
        tokens = sum(len(self.chunks[i][0]) for i in picks)
        return {"idx": idx, "mask": target[:, 1:], "tokens": tokens}  # (B, T), (B, T-1)
