"""Token data for training, distillation and calibration: documents -> one token stream -> windows.

The default documents are the fetched human corpus (`lilliput data fetch`) when present, else
the small sample shipped in the package; held-out text (LAMBADA passages) shares no source
with either.
"""

from __future__ import annotations

import torch

from lilliput.data.corpus import Document, load_corpus, sample_documents


def default_documents(prefer_full: bool = True) -> list[Document]:
    """The fetched corpus if it is in the cache, else the shipped sample."""
    if prefer_full:
        try:
            return load_corpus(verify=False)
        except (FileNotFoundError, ValueError):
            pass
    return sample_documents()


def token_stream(tokenizer, documents: list[Document], eos_between: bool = True) -> torch.Tensor:
    """All documents tokenized and concatenated (EOS between documents): a 1-D LongTensor."""
    ids: list[int] = []
    sep = [tokenizer.eos_id] if eos_between and tokenizer.eos_id is not None else []
    for doc in documents:
        ids.extend(tokenizer.encode(doc.text, bos=None))
        ids.extend(sep)
    if not ids:
        raise ValueError("the documents hold no text to tokenize")
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n windows of seq_len tokens at random offsets (deterministic for a seed): (n, seq_len)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if stream.numel() < seq_len + 1:
        raise ValueError(f"the token stream ({stream.numel()} tokens) is shorter than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


VAL_FRACTION = 0.05
"""Held-out share of a token stream (or of every shard) unless told otherwise."""


def split_stream(stream: torch.Tensor, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) by cutting the stream; the validation part is the tail."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(stream.numel() * (1 - val_fraction))
    return stream[:cut], stream[cut:]
