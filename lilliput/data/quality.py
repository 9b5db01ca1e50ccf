"""Heuristic quality rules for web-like text, with their published thresholds: Gopher's quality
and repetition rules (Rae et al. 2021, appendix A; the thresholds datatrove ships) and C4's line
filters (Raffel et al. 2020, section 2.2).

Each rule is a pure function from a text to a verdict: `None` keeps it, a string says why it
is removed ("gopher_quality: mean word length 2.1 < 3"). C4's line filter also edits the
text (it drops lines), so it returns the new text too. Words come from a regular expression
(words, and runs of punctuation as their own tokens, as NLTK's word_tokenize splits English):
datatrove's versions of these rules call NLTK, which downloads its models at first use and so
breaks offline use; these need no download.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
PUNCTUATION = set(string.punctuation) | set("“”‘’«»…—–")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "-", "*", "·", "‣", "⁃")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


# --- Gopher quality -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GopherQualityConfig:
    min_words: int = 50
    """Fewest words (tokens with a letter or digit) in a document."""
    max_words: int = 100_000
    """Most words in a document."""
    min_mean_word_length: float = 3.0
    """Shortest mean word length, in characters."""
    max_mean_word_length: float = 10.0
    """Longest mean word length, in characters."""
    max_symbol_word_ratio: float = 0.1
    """Most "#" and ellipses per word."""
    max_bullet_lines_ratio: float = 0.9
    """Most lines that start with a bullet point."""
    max_ellipsis_lines_ratio: float = 0.3
    """Most lines that end with an ellipsis."""
    min_alpha_words_ratio: float = 0.8
    """Fewest words with at least one alphabetic character."""
    min_stop_words: int = 2
    """Fewest English stop words (the, be, to, of, and, that, have, with)."""


def gopher_quality(text: str, cfg: GopherQualityConfig = GopherQualityConfig()) -> str | None:
    """Gopher's quality rules: None keeps the text, else the first rule it breaks."""
    tokens = words_of(text)
    words = [w for w in tokens if any(c not in PUNCTUATION for c in w)]
    n = len(words)
    if n < cfg.min_words:
        return f"{n} words < {cfg.min_words}"
    if n > cfg.max_words:
        return f"{n} words > {cfg.max_words}"
    mean = sum(len(w) for w in words) / n
    if mean < cfg.min_mean_word_length:
        return f"mean word length {mean:.2f} < {cfg.min_mean_word_length}"
    if mean > cfg.max_mean_word_length:
        return f"mean word length {mean:.2f} > {cfg.max_mean_word_length}"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return f"symbol/word ratio {symbols / n:.3f} > {cfg.max_symbol_word_ratio}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        bullets = sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines)
        if bullets > cfg.max_bullet_lines_ratio:
            return f"bullet lines {bullets:.2f} > {cfg.max_bullet_lines_ratio}"
        ellipsis = sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines)
        if ellipsis > cfg.max_ellipsis_lines_ratio:
            return f"ellipsis lines {ellipsis:.2f} > {cfg.max_ellipsis_lines_ratio}"
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n
    if alpha < cfg.min_alpha_words_ratio:
        return f"alphabetic words {alpha:.2f} < {cfg.min_alpha_words_ratio}"
    stop = sum(w.lower() in STOP_WORDS for w in words)
    if stop < cfg.min_stop_words:
        return f"{stop} stop words < {cfg.min_stop_words}"
    return None


# --- Gopher repetition --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GopherRepetitionConfig:
    max_dup_line_frac: float = 0.3
    """Most lines that repeat an earlier line."""
    max_dup_para_frac: float = 0.3
    """Most paragraphs that repeat an earlier paragraph."""
    max_dup_line_char_frac: float = 0.2
    """Most characters in repeated lines."""
    max_dup_para_char_frac: float = 0.2
    """Most characters in repeated paragraphs."""
    top_ngram_fracs: tuple[float, ...] = (0.2, 0.18, 0.16)
    """Most characters in the most frequent 2-, 3- and 4-gram."""
    dup_ngram_fracs: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    """Most characters in repeated 5-, 6-, 7-, 8-, 9- and 10-grams."""


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count += 1
            chars += len(x)
        else:
            seen.add(x)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram, counted at every occurrence (0 if none repeats)."""
    grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier one, jumping past each repeat (no overlaps)."""
    seen: set[tuple[str, ...]] = set()
    chars, i = 0, 0
    while i <= len(words) - n:
        gram = tuple(words[i:i + n])
        if gram in seen:
            chars += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition(text: str, cfg: GopherRepetitionConfig = GopherRepetitionConfig()) -> str | None:
    """Gopher's repetition rules: None keeps the text, else the first rule it breaks."""
    if not text.strip():
        return "empty"
    paras = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
    count, chars = _duplicates(paras)
    if count / len(paras) > cfg.max_dup_para_frac:
        return f"duplicate paragraphs {count / len(paras):.2f} > {cfg.max_dup_para_frac}"
    if chars / len(text) > cfg.max_dup_para_char_frac:
        return f"characters in duplicate paragraphs {chars / len(text):.2f} > {cfg.max_dup_para_char_frac}"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    count, chars = _duplicates(lines)
    if count / len(lines) > cfg.max_dup_line_frac:
        return f"duplicate lines {count / len(lines):.2f} > {cfg.max_dup_line_frac}"
    if chars / len(text) > cfg.max_dup_line_char_frac:
        return f"characters in duplicate lines {chars / len(text):.2f} > {cfg.max_dup_line_char_frac}"
    words = [w for w in words_of(text) if any(c not in PUNCTUATION for c in w)]
    for n, frac in zip((2, 3, 4), cfg.top_ngram_fracs):
        share = _top_ngram_chars(words, n) / len(text)
        if share > frac:
            return f"top {n}-gram covers {share:.3f} of characters > {frac}"
    for n, frac in zip(range(5, 11), cfg.dup_ngram_fracs):
        share = _dup_ngram_chars(words, n) / len(text)
        if share > frac:
            return f"repeated {n}-grams cover {share:.3f} of characters > {frac}"
    return None


# --- C4 lines -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class C4Config:
    min_words_per_line: int = 3
    """Lines with fewer words are dropped."""
    min_sentences: int = 5
    """Documents with fewer sentences left are removed."""
    max_word_length: int = 1000
    """Lines with a longer word are dropped."""
    terminal_punctuation: bool = True
    """Drop lines that do not end in terminal punctuation (. ! ? " ')."""
    remove_citations: bool = True
    """Strip Wikipedia-style markers: [1], [edit], [citation needed]."""


_END = (".", "!", "?", '"', "'", "”", "’")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"'”’)\]]*)(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences, as runs of text ending in . ! or ? (then quotes or brackets) before a space."""
    return len([s for s in _SENTENCE_END.split(text) if s.strip()]) if _SENTENCE_END.search(text) else 0


def c4_lines(text: str, cfg: C4Config = C4Config()) -> tuple[str | None, str, int]:
    """C4's filters: (verdict, text with bad lines dropped, lines dropped). A verdict of None keeps it."""
    low = text.lower()
    if "lorem ipsum" in low:
        return "contains 'lorem ipsum'", text, 0
    if "{" in text:
        return "contains a curly bracket (code)", text, 0
    kept, dropped = [], 0
    for line in text.split("\n"):
        if cfg.remove_citations:
            line = _CITATION.sub("", line)
        s = line.strip()
        if not s:
            kept.append("")
            continue
        lw = s.lower()
        bad = ((cfg.terminal_punctuation and not s.endswith(_END))
               or len(s.split()) < cfg.min_words_per_line
               or max(len(w) for w in s.split()) > cfg.max_word_length
               or "javascript" in lw or any(p in lw for p in _POLICY))
        if bad:
            dropped += 1
        else:
            kept.append(line)
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    n = count_sentences(out)
    if n < cfg.min_sentences:
        return f"{n} sentences left after dropping {dropped} lines < {cfg.min_sentences}", out, dropped
    return None, out + "\n", dropped
