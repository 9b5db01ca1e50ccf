"""Offline teacher logits: the teacher's top-k log-probabilities per token, memory-mapped on disk.

Run the teacher once over a fixed set of windows and reuse the result for any number of student
runs (losses, seeds, sizes). A cache is a folder of numpy files opened with `mmap_mode="r"`:

    tokens.npy     (N, S)    int32    the windows (S = seq_len + 1 tokens each)
    topk_ids.npy   (N, S-1, k) int32  the teacher's k most likely next tokens at each position
    topk_logp.npy  (N, S-1, k) float16 their full-vocabulary log-probabilities (temperature 1)
    meta.json      k, shapes, teacher name, tokenizer fingerprint

k ids * 4 bytes + k values * 2 bytes = 6k bytes per token (384 B for k=64, 192 B for k=32) against
2V bytes for dense fp16 logits (98 KB for SmolLM2's 49,152). Log-probs, not logits, are stored
so the mass outside the top k is known (1 - sum exp): the losses use it as a "rest" bucket
(see losses.py). fp16 keeps ~3 significant digits of a log-prob: relative error < 0.1% on
probabilities above e^-8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from tqdm import tqdm

from lilliput.core.record import write_json
from lilliput.train.losses import TopK

META = "meta.json"


class LogitCache:
    """A read-only view of a cache folder; `cache[rows]` -> (tokens (n, S), TopK (n, S-1, k))."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a logit cache (no {META}): build one with build_logit_cache")
        self.meta = json.loads(meta_path.read_text())
        self.tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")  # (N, S) int32
        self.ids = np.load(self.folder / "topk_ids.npy", mmap_mode="r")  # (N, S-1, k) int32
        self.logp = np.load(self.folder / "topk_logp.npy", mmap_mode="r")  # (N, S-1, k) fp16
        if self.meta.get("complete") is not True:
            raise ValueError(f"{self.folder} is an unfinished logit cache: delete it and build it again")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def bytes_per_token(self) -> float:
        n = self.ids.shape[0] * self.ids.shape[1]
        return (self.ids.nbytes + self.logp.nbytes) / n

    def __getitem__(self, rows) -> tuple[torch.Tensor, TopK]:
        rows = np.sort(np.asarray(rows))
        tokens = torch.from_numpy(self.tokens[rows].astype(np.int64))
        ids = torch.from_numpy(self.ids[rows].astype(np.int64))
        logp = torch.from_numpy(self.logp[rows].astype(np.float32))
        return tokens, TopK(ids, logp)


@torch.inference_mode()
def teacher_topk(teacher: torch.nn.Module, idx: torch.Tensor, k: int) -> TopK:
    """The teacher's top-k next-token log-probs for idx (B, T): TopK of (B, T, k)."""
    logp = F.log_softmax(teacher(idx).float(), dim=-1)  # (B, T, V)
    values, ids = logp.topk(k, dim=-1)
    return TopK(ids, values)


def build_logit_cache(teacher: torch.nn.Module, windows: torch.Tensor, out: Path | str, k: int = 64,
                      batch_size: int = 8, meta: dict | None = None, progress: bool = True) -> LogitCache:
    """Run `teacher` over windows (N, S) and write a cache of its top-k at the first S-1 positions.

    An existing complete cache with the same windows and k is reused as it is."""
    out = Path(out)
    N, S = windows.shape
    if k < 1 or k > teacher.config.vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={teacher.config.vocab_size}], got {k}")
    if (out / META).is_file():
        try:
            cache = LogitCache(out)
            same = cache.k == k and np.array_equal(cache.tokens, windows.numpy().astype(np.int32))
            if same:
                return cache
        except (ValueError, FileNotFoundError):
            pass
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    np.save(out / "tokens.npy", windows.numpy().astype(np.int32))
    ids = open_memmap(out / "topk_ids.npy", mode="w+", dtype=np.int32, shape=(N, S - 1, k))
    logp = open_memmap(out / "topk_logp.npy", mode="w+", dtype=np.float16, shape=(N, S - 1, k))
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    bar = tqdm(total=N, desc="teacher logits", unit="seq", file=sys.stderr, disable=not progress)
    for i in range(0, N, batch_size):
        top = teacher_topk(teacher, windows[i:i + batch_size, :-1].to(device), k)
        ids[i:i + batch_size] = top.ids.cpu().numpy().astype(np.int32)
        logp[i:i + batch_size] = top.logprobs.cpu().numpy().astype(np.float16)
        bar.update(min(batch_size, N - i))
    bar.close()
    teacher.train(was_training)
    ids.flush()
    logp.flush()
    del ids, logp
    write_json(out / META, {"complete": True, "k": k, "windows": N, "seq_len": S - 1, **(meta or {})})
    return LogitCache(out)


class CachedBatches:
    """Batch source over a logit cache for the trainer: batch `index` is a pure function of (seed, index).

    Rows are visited in a seeded permutation per epoch, so every cached window is used once per epoch.
    Batches are {"idx": (B, S), "topk_ids": (B, S-1, k), "topk_logp": (B, S-1, k)}."""

    def __init__(self, cache: LogitCache, batch_size: int, seed: int = 0):
        if batch_size > len(cache):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(cache)} cached windows")
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.per_epoch = len(cache) // batch_size

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(index, self.per_epoch)
        perm = torch.randperm(len(self.cache), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        rows = perm[j * self.batch_size:(j + 1) * self.batch_size].numpy()
        tokens, top = self.cache[rows]
        return {"idx": tokens, "topk_ids": top.ids, "topk_logp": top.logprobs}
