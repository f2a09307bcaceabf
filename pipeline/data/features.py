"""Text features shared by the quality rules: lines, words (per language), n-gram hashes.

Every rule needs some of the same things (lines, words, paragraphs, n-gram counts). `features_of`
computes them once per document text and language and caches them on the document, so the chain
splits words once, not once per rule. Words come from the document language's splitter
(pipeline/data/words.py): a segmenter for Chinese, Japanese and Thai, spaCy-style rules for
spaced scripts, so the Gopher/C4 numbers agree with datatrove's spaCy-based filters on English
(bench/filters.py measures the agreement) at a small fraction of the cost.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import numpy as np

from pipeline.data.document import Document
from pipeline.data.words import split_words

# Unicode Sentence_Terminal characters of the BMP (the set FineWeb's line rule uses), plus the halfwidth stop.
TERMINAL_PUNCT = tuple(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965"
    "\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944"
    "\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c"
    "\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877"
    "\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e"
    "\uff1f\uff61"
)
# A "symbol word" consists only of these: ASCII punctuation, C0/C1 controls, common typographic marks.
PUNCT = frozenset(
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»´–—‘’“”„…∶━►、〈〉《》「」『』【】〔〕・·％（），．１：；？～！"
    + "".join(map(chr, [*range(0, 32), *range(127, 160)]))
).union(TERMINAL_PUNCT)
_SENT_END = frozenset(".!?。！？｡։؟۔।॥")  # tokens after which spaCy's sentencizer starts a sentence
_MULTIPLIERS = np.random.default_rng(0).integers(1, 2**63, size=16, dtype=np.uint64) * np.uint64(
    2
) + np.uint64(1)


def count_sentences(line: str, tokens: list[str] | None = None, language: str | None = None) -> int:
    """Sentences in a line as spaCy's sentencizer splits them: a run of end marks followed by a token."""
    tokens = split_words(line, language) if tokens is None else tokens
    n, after_end = (1 if tokens else 0), False
    for tok in tokens:
        if tok in _SENT_END:
            after_end = True
        elif after_end:
            n, after_end = n + 1, False
    return n


def duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated elements, characters in repeated elements): every occurrence after the first counts."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n, chars = n + 1, chars + len(item)
        else:
            seen.add(item)
    return n, chars


class Features:
    """Lazily computed, cached text features; one instance per document text and language."""

    def __init__(self, text: str, language: str | None = None, line_tokens: list[list[str]] | None = None):
        self.text, self.language = text, language
        if line_tokens is not None:  # already split (C4 passes on the tokens of the lines it kept)
            self.__dict__["line_tokens"] = line_tokens

    @cached_property
    def line_tokens(self) -> list[list[str]]:
        """Words per line of `lines`, by the language's splitter (no word crosses a line break)."""
        return [split_words(line, self.language) for line in self.lines]

    @cached_property
    def words(self) -> list[str]:
        return list(itertools.chain.from_iterable(self.line_tokens))

    @cached_property
    def content_words(self) -> list[str]:
        """Words with at least one character that is not punctuation."""
        return [w for w in self.words if w.isalnum() or not PUNCT.issuperset(w)]

    @cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @cached_property
    def nonempty_lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line.strip()]

    @cached_property
    def word_lengths_prefix(self) -> np.ndarray:
        """(len(words) + 1,) running sum of word lengths: characters of words[i:j] = p[j] - p[i]."""
        out = np.zeros(len(self.words) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, self.words), np.int64, len(self.words)), out=out[1:])
        return out

    @cached_property
    def word_ids(self) -> np.ndarray:
        """One uint64 per word, equal for equal words (Python's string hash: only compared within a text)."""
        return np.fromiter(map(hash, self.words), np.int64, len(self.words)).view(np.uint64)

    def ngram_hashes(self, n: int) -> np.ndarray:
        """(len(words) - n + 1,) uint64 hash of each word n-gram (wrapping polynomial in word ids);
        built from the (n-1)-gram hashes when those were needed already."""
        cache = self.__dict__.setdefault("_ngram_cache", {})
        if n in cache:
            return cache[n]
        ids = self.word_ids
        count = max(len(ids) - n + 1, 0)
        with np.errstate(over="ignore"):
            if n - 1 in cache and count:
                out = cache[n - 1][:count] + (ids[n - 1 : n - 1 + count] + np.uint64(1)) * _MULTIPLIERS[n - 1]
            else:
                out = np.zeros(count, dtype=np.uint64)
                for k in range(n if count else 0):
                    out += (ids[k : k + count] + np.uint64(1)) * _MULTIPLIERS[k]
        cache[n] = out
        return out

    def top_ngram_chars(self, n: int) -> int:
        """Characters covered by the most frequent word n-gram (its length, spaces included, times its
        count); among equally frequent n-grams the one seen first, as collections.Counter picks it."""
        hashes = self.ngram_hashes(n)
        if not len(hashes):
            return 0
        _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        best = counts.max()
        i = int(first[counts == best].min())
        pre = self.word_lengths_prefix
        return int(pre[i + n] - pre[i] + n - 1) * int(best)

    def _repeats(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n-gram hashes, mask of the positions whose n-gram occurred before), cached per n."""
        cache = self.__dict__.setdefault("_repeat_cache", {})
        if n not in cache:
            hashes = self.ngram_hashes(n)
            _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
            cache[n] = hashes, first[inverse] < np.arange(len(hashes))
        return cache[n]

    def repeated_ngram_bound(self, n: int, m: int | None = None) -> int:
        """An upper bound of `repeated_ngram_chars(n)` (characters of the words covered by any
        repeated n-gram), without the scan.
        With m <= n it uses the m-gram repeats: an n-gram repeats only where its first m words do."""
        m = n if m is None else m
        _, repeats = self._repeats(m)
        pre = self.word_lengths_prefix
        starts = np.nonzero(repeats)[0]
        starts = starts[starts + n < len(pre)]
        cover = np.zeros(len(pre), dtype=np.int64)  # words inside any repeated n-gram: their union
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        inside = np.cumsum(cover[:-1]) > 0
        return int(np.diff(pre)[inside].sum())

    def repeated_ngram_chars(self, n: int) -> int:
        """Characters in word n-grams that repeat an earlier one (a repeat jumps n words, no overlap)."""
        hashes, repeats = self._repeats(n)
        if not repeats.any():
            return 0  # nothing repeats: no scan needed
        start = int(repeats.argmax())  # every n-gram before the first repeat is new
        values, pre = hashes.tolist(), self.word_lengths_prefix
        seen = set(values[:start])
        chars, i, last = 0, start, len(values) - 1
        while i <= last:
            if values[i] in seen:
                chars += int(pre[i + n] - pre[i])
                i += n
            else:
                seen.add(values[i])
                i += 1
        return chars


def features_of(doc: Document, language: str | None = None) -> Features:
    """The document's features in `language`, computed once per text (a changed text gets new ones)."""
    feats = doc.features
    if not isinstance(feats, Features) or feats.text is not doc.text or feats.language != language:
        feats = doc.features = Features(doc.text, language)
    return feats
