"""The word tokenizer of the curation rules: datatrove's spaCy tokenizer, the same words and sentences,
without its per-call cost.

datatrove's `SpaCyTokenizer` opens a spaCy memory zone around every call, so that a long run's
vocabulary does not grow without bound. Inside a zone spaCy caches nothing: each call builds every
lexeme it meets again and splits every word's affixes again, and C4's rule calls it once per line.
Profiled on the shipped corpus: ~950 us per 20-word line, ~2.8 ms per 200-word document.

`CachedSpaCyTokenizer` opens no zone: spaCy keeps its lexemes and its cache of split words, ~70 us
a line and ~0.4 ms a document once the words have been seen. Memory stays bounded another way:
once spaCy has learnt `max_words` words, its pipeline is dropped and a new one built (~0.2 s). Word lists come from spaCy's tokenizer alone (the sentencizer marks sentence starts and
changes no token); sentences go through the sentencizer, as in datatrove. Caches change what spaCy
keeps, not what it returns: words and sentences are datatrove's (tests/test_curate.py compares them
on the shipped corpus, and bench/curate.py the rules' verdicts).

Pass it to datatrove's filters as their `language` (datatrove's `load_word_tokenizer` takes a
tokenizer in place of a language code):

    words = CachedSpaCyTokenizer("en")
    C4QualityFilter(language=words), GopherQualityFilter(language=words)
"""

from __future__ import annotations

from datatrove.utils.word_tokenizers import SpaCyTokenizer, strip_strings


class CachedSpaCyTokenizer(SpaCyTokenizer):
    """datatrove's spaCy tokenizer for `language`, its caches kept until it has learnt `max_words` words."""

    def __init__(self, language: str = "en", max_words: int = 200_000):
        if language in ("ja", "zh", "vi"):  # datatrove configures these with their own segmenters
            raise ValueError(f"CachedSpaCyTokenizer takes languages spaCy tokenizes blank, not {language!r}")
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        super().__init__(language)
        self.max_words = max_words
        self._built_with = 0  # the vocabulary's size when the pipeline was built (its own lexemes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}  # each task builds its own pipeline

    def _doc(self, text: str, sentences: bool):
        if self._tokenizer is not None and len(self._tokenizer.vocab) - self._built_with > self.max_words:
            self._tokenizer = None  # a new pipeline: the old one's vocabulary and caches are freed
        if self._tokenizer is None:
            self._built_with = len(self.tokenizer.vocab)
        nlp = self.tokenizer
        nlp.max_length = len(text) + 10
        return nlp(text) if sentences else nlp.make_doc(text)

    # "IS_ALPHA" can break spaCy's tokenizer and datatrove then retries without it (whether it breaks depends
    # on what the tokenizer met before): such a text goes through datatrove's own code

    def word_tokenize(self, text: str) -> list[str]:
        if "IS_ALPHA" in text:
            return super().word_tokenize(text)
        return strip_strings([t.text for t in self._doc(text, sentences=False)])

    def sent_tokenize(self, text: str) -> list[str]:
        if "IS_ALPHA" in text:
            return super().sent_tokenize(text)
        return strip_strings([s.text for s in self._doc(text, sentences=True).sents])

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if "IS_ALPHA" in text:
            return super().span_tokenize(text)
        return [(s.start_char, s.end_char) for s in self._doc(text, sentences=True).sents]
