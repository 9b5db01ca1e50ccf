"""What "near-duplicate" means in lilliput: the Jaccard similarity of two texts' sets of word 5-grams.

One definition, used by the MinHash signatures of curation (lilliput.data.near_dedup, which hashes
these shingles), by its exact check of candidate pairs, and by the planted ground truth that
deduplication is measured against (lilliput.data.planted):

- words: the runs of Unicode word characters (`\\w+`) of the lower-cased text: punctuation and
  whitespace separate words and are dropped; digits are kept as they are;
- shingles: each `n` consecutive words joined by one space; a text of fewer than `n` words (but at
  least one) is one shingle, the whole of it; a text without words has none.

datatrove's own shingles (spaCy tokens of `simplify_text`, which also turns every number into 0)
are close but not the same: a copy whose changed words differ only in their digits would look
identical to it.
"""

from __future__ import annotations

import re

WORD = re.compile(r"\w+")
N = 5
"""Words per shingle."""


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def shingles(text: str, n: int = N) -> set[str]:
    """The set of `n`-word shingles of `text`."""
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str, n: int = N) -> float:
    """|A & B| / |A | B| of the two texts' shingle sets (1.0 for two texts without words)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0
