"""Token shards: a corpus tokenized once into memory-mapped .npy files, and batches drawn from them.

    shards = TokenShards.cached("books/", tokenizer)        # tokenizes on the first call only
    train = shards.batches("train", batch_size=32, seq_len=256)
    val = shards.batches("val", batch_size=32, seq_len=256)
    Trainer(objective, train, cfg, evaluate=...)             # train(index) -> {"idx": (32, 257)}

The cache folder is keyed by a digest of the input files' sha256 and the tokenizer, so a
changed file or tokenizer builds new shards and an unchanged one reuses them. Documents are
joined into one stream (EOS between them when the tokenizer has one) cut into shards of
`shard_tokens` tokens, stored as uint16 when the vocabulary fits, else uint32. The held-out
split is the tail `val_fraction` of every shard, so it spans the whole corpus without sharing
a window with training. A batch is a pure function of (seed, index), so resuming is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from lilliput.train.data import VAL_FRACTION, default_documents

FORMAT = "lilliput.shards/1"
SHARD_TOKENS = 1 << 24
TEXT_SUFFIXES = (".txt", ".md")


def default_shard_dir() -> Path:
    """`$LILLIPUT_CACHE/shards`, else `~/.cache/lilliput/shards`."""
    root = os.environ.get("LILLIPUT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lilliput") / "shards"


def data_files(data: str | Path) -> list[Path]:
    """A file is itself; a folder is every .txt, .md and .jsonl file under it, sorted."""
    path = Path(data)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"training data {data} not found: pass a text file, a .jsonl file or a folder")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    if not files:
        raise FileNotFoundError(f"no .txt, .md or .jsonl files under {data}")
    return files


def read_texts(path: Path) -> Iterator[str]:
    """A .jsonl file's "text" fields (one document per line); any other file is one document."""
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None


def tokenizer_key(tokenizer) -> str:
    """The vocabulary size and the ids of a probe text: enough to tell tokenizers apart."""
    probe = "Hello, world! 12345 ÀÉÎ 日本語\n\tThe quick brown fox."
    return hashlib.sha256(json.dumps([tokenizer.vocab_size, tokenizer.eos_id,
                                      tokenizer.encode(probe, bos=False)]).encode()).hexdigest()[:16]


class TokenShards:
    """The memory-mapped shards of one tokenized corpus (a folder written by `build`)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no token shards (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        self.shards = [np.load(self.folder / name, mmap_mode="r") for name in self.meta["shards"]]

    def __repr__(self) -> str:
        return f"TokenShards({self.folder}, {len(self.shards)} shards, {self.tokens:,} tokens)"

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    # -- building --

    @classmethod
    def build(cls, texts: Iterable[str], tokenizer, folder: Path | str, shard_tokens: int = SHARD_TOKENS,
              meta: dict | None = None) -> "TokenShards":
        """Tokenize `texts` into shards under `folder` (written aside, then moved into place)."""
        folder = Path(folder)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        names, pending, size, documents = [], [], 0, 0

        def flush(final: bool) -> None:
            nonlocal pending, size
            joined = np.concatenate(pending) if pending else np.zeros(0, dtype)
            while len(joined) >= shard_tokens or (final and len(joined)):
                names.append(f"shard_{len(names):05d}.npy")
                np.save(tmp / names[-1], joined[:shard_tokens])
                joined = joined[shard_tokens:]
            pending, size = ([joined] if len(joined) else []), len(joined)

        sep = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        for text in texts:
            ids = np.asarray(tokenizer.encode(text, bos=False) + sep, dtype=dtype)
            pending.append(ids)
            size += len(ids)
            documents += 1
            if size >= shard_tokens:
                flush(final=False)
        flush(final=True)
        if not names:
            shutil.rmtree(tmp)
            raise ValueError("the training data holds no text to tokenize")
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "shards": names, "documents": documents,
                                                   "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                                                   **(meta or {})}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a rank on this node) finished the same shards first
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)
        return cls(folder)

    @classmethod
    def cached(cls, data: str | Path | None, tokenizer, cache_dir: Path | str | None = None,
               shard_tokens: int = SHARD_TOKENS) -> "TokenShards":
        """The shards of `data` (a file, a folder, or None for the default corpus) for `tokenizer`,
        built on the first call and reused while the files and the tokenizer are unchanged."""
        h = hashlib.sha256(json.dumps([FORMAT, tokenizer_key(tokenizer), shard_tokens]).encode())
        if data is None:
            docs = default_documents()
            texts: Iterable[str] = [d.text for d in docs]
            source = f"default corpus ({len(docs)} documents)"
            for t in texts:
                h.update(hashlib.sha256(t.encode()).digest())
        else:
            files = data_files(data)
            for f in files:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            texts = (t for f in files for t in read_texts(f))
            source = str(data)
        digest = h.hexdigest()
        folder = Path(cache_dir or default_shard_dir()) / digest[:16]
        if (folder / "meta.json").is_file():
            return cls(folder)
        return cls.build(texts, tokenizer, folder, shard_tokens,
                         meta={"digest": digest, "source": source, "tokenizer": tokenizer_key(tokenizer)})

    # -- reading --

    def batches(self, split: str, batch_size: int, seq_len: int, val_fraction: float = VAL_FRACTION,
                seed: int = 0) -> "ShardBatches":
        return ShardBatches(self, split, batch_size, seq_len, val_fraction, seed)


class ShardBatches:
    """Random windows of seq_len + 1 tokens from one split of `TokenShards`: batch `index` is a pure
    function of (seed, index, split), {"idx": (batch_size, seq_len + 1) int64}."""

    def __init__(self, shards: TokenShards, split: str, batch_size: int, seq_len: int,
                 val_fraction: float = VAL_FRACTION, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.shards, self.split, self.batch_size, self.seq_len = shards, split, batch_size, seq_len
        self.seed = seed * 2 + (split == "val")
        self.parts = []  # (shard, first token, number of window starts)
        for s in shards.shards:
            cut = int(len(s) * (1 - val_fraction))
            lo, hi = (0, cut) if split == "train" else (cut, len(s))
            starts = hi - lo - seq_len
            if starts > 0:
                self.parts.append((s, lo, starts))
        if not self.parts:
            raise ValueError(f"the {split} split ({shards.tokens:,} tokens in all, val_fraction {val_fraction}) "
                             f"has no window of {seq_len + 1} tokens: use a shorter seq_len or more data")
        self.ends = np.cumsum([n for _, _, n in self.parts])

    @property
    def tokens(self) -> int:
        """Window starts in this split (about its size in tokens)."""
        return int(self.ends[-1])

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        picks = torch.randint(0, int(self.ends[-1]), (self.batch_size,), generator=g, dtype=torch.int64).numpy()
        rows = []
        for pick in picks:
            k = int(np.searchsorted(self.ends, pick, side="right"))
            shard, lo, _ = self.parts[k]
            start = lo + int(pick - (self.ends[k - 1] if k else 0))
            rows.append(np.asarray(shard[start:start + self.seq_len + 1], dtype=np.int64))
        return {"idx": torch.from_numpy(np.stack(rows))}  # (B, T+1)

    @torch.no_grad()
    def mean_loss(self, objective: torch.nn.Module, n_batches: int) -> float:
        """Mean next-token cross-entropy of `objective` (returning (loss, {"ce": ...})) over batches
        0..n_batches-1: the same windows at every evaluation."""
        device = next(objective.parameters()).device
        total = 0.0
        for i in range(n_batches):
            loss, metrics = objective({"idx": self(i)["idx"].to(device)})
            total += float(metrics.get("ce", loss))
        return total / n_batches
