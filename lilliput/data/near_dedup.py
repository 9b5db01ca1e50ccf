"""Near-duplicates on datatrove's MinHash stages, every candidate pair checked exactly.

datatrove finds near-duplicates in four stages: signatures (the MinHash of each document, one file
per band), buckets (documents whose signatures agree on a whole band become candidate pairs),
clusters (union-find over the pairs) and filter (one document of each cluster stays). It never
checks a candidate: the bands alone decide, so a pair below the threshold that shares a band is
removed and a pair above it that shares none is kept. lilliput adds:

- `ShingleSignature`: datatrove's signature stage over lilliput's shingles (lilliput.data.shingles,
  the definition the planted truth is measured with), hashed with datatrove's hash function
  (xxhash64). Beside the signatures it keeps each document's sorted set of shingle hashes:
  `shingles/<rank>.bin` (uint64, the sets one after the other) and `shingles/<rank>.offsets`
  (uint64, where each document's set starts, one more than the documents of the task).
- `VerifyCandidates`: runs after datatrove's buckets step, in the same task. It reads that task's
  candidate pairs (`<bucket>_<worker>.dups`: records of four little-endian uint32, the signature
  file's rank and the document's index in it, twice), computes the Jaccard of each pair's shingle
  sets and writes the pairs at or above the threshold, in the same format and under the same name,
  to the folder datatrove's clusters stage reads. The Jaccard of the hash sets is the Jaccard of the
  shingle sets unless two shingles share a 64-bit hash.
- `candidate_bands`: with every candidate checked, bands and rows can favour recall; precision
  comes from the check.

The formats are datatrove 0.10.1's (datatrove/pipeline/dedup/minhash.py: `MinhashDedupSignature`,
`MinhashDedupBuckets`, `MinhashDedupCluster`).
"""

from __future__ import annotations

import struct

import numpy as np
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import SENTINEL, MinhashConfig, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file

from lilliput.data.shingles import shingles

PAIR = "<4I"
"""A candidate pair in datatrove's .dups files: (file, doc, file, doc)."""


def candidate_bands(threshold: float, num_perm: int, recall: float) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm: the most rows per band (the fewest candidates) for which
    a pair of Jaccard `threshold` shares a band with probability >= `recall`: 1 - (1 - s^rows)^bands."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class ShingleSignature(MinhashDedupSignature):
    """datatrove's MinHash signature stage over lilliput's shingles; keeps each document's shingle
    hashes for `VerifyCandidates` when `keep_sets`."""

    name = "🎯 MinHash stage 1 (lilliput shingles)"

    def __init__(self, output_folder: DataFolderLike, config: MinhashConfig, keep_sets: bool = True):
        super().__init__(output_folder, config=config)
        self.keep_sets = keep_sets
        self._sets, self._offsets = None, [0]

    def get_shingles(self, text: str) -> np.ndarray:
        hashes = np.unique(np.fromiter(map(self._hash_func, shingles(text, self.config.n_grams)), dtype=np.uint64))
        if self._sets is not None:
            self._sets.write(hashes.astype("<u8").tobytes())
            self._offsets.append(self._offsets[-1] + hashes.size)
        return hashes.reshape(-1, 1)  # (shingles, 1): what datatrove's get_signature takes

    def run(self, data, rank: int = 0, world_size: int = 1):
        if not self.keep_sets:
            return super().run(data, rank, world_size)
        self._offsets = [0]
        with self.output_folder.open(f"shingles/{rank:05d}.bin", mode="wb") as self._sets:
            super().run(data, rank, world_size)
        self._sets = None
        with self.output_folder.open(f"shingles/{rank:05d}.offsets", mode="wb") as f:
            f.write(np.asarray(self._offsets, dtype="<u8").tobytes())


class ShingleSets:
    """The shingle hashes `ShingleSignature` kept: `sets(file, doc)` -> sorted uint64 array."""

    def __init__(self, folder: DataFolderLike):
        self.folder = get_datafolder(folder)
        self._offsets: dict[int, np.ndarray] = {}
        self._files: dict[int, object] = {}

    def __call__(self, file: int, doc: int) -> np.ndarray:
        if file not in self._offsets:
            with self.folder.open(f"shingles/{file:05d}.offsets", mode="rb") as f:
                self._offsets[file] = np.frombuffer(f.read(), dtype="<u8")
            self._files[file] = self.folder.open(f"shingles/{file:05d}.bin", mode="rb")
        start, end = (int(x) for x in self._offsets[file][doc:doc + 2])
        f = self._files[file]
        f.seek(start * 8)
        return np.frombuffer(f.read((end - start) * 8), dtype="<u8")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted arrays of distinct values."""
    both = np.intersect1d(a, b, assume_unique=True).size
    return both / (a.size + b.size - both) if a.size or b.size else 1.0


class VerifyCandidates(PipelineStep):
    """Keeps the candidate pairs of this buckets task whose shingle sets have Jaccard >= `threshold`.

    Put it after `MinhashDedupBuckets(signatures, candidates)` in the same stage; datatrove's
    `MinhashDedupCluster` then reads `output`. Pairs with an index's document (no text here) pass."""

    type = "🫂 - DEDUP"
    name = "🎯 lilliput: exact Jaccard of MinHash candidates"

    def __init__(self, candidates: DataFolderLike, signatures: DataFolderLike, output: DataFolderLike,
                 config: MinhashConfig, threshold: float):
        super().__init__()
        self.candidates, self.signatures = get_datafolder(candidates), get_datafolder(signatures)
        self.output, self.config, self.threshold = get_datafolder(output), config, threshold

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        bucket, worker = divmod(rank, world_size // self.config.num_buckets)  # as MinhashDedupBuckets names it
        name = f"{bucket:05d}_{worker:02d}.dups"
        sets = ShingleSets(self.signatures)
        with self.track_time(), self.candidates.open(name, mode="rb") as fi, self.output.open(name, mode="wb") as fo:
            for f1, d1, f2, d2 in read_tuples_from_file(fi, PAIR[1:]):
                self.stat_update("candidates")
                if f1 == SENTINEL:
                    keep = True
                    self.stat_update("index_matches")
                else:
                    keep = set_jaccard(sets(f1, d1), sets(f2, d2)) >= self.threshold
                    self.stat_update("kept" if keep else "below_threshold")
                if keep:
                    fo.write(struct.pack(PAIR, f1, d1, f2, d2))
        sets.close()
        return data
