"""Quality filters: Gopher repetition, Gopher quality, C4 and FineWeb rules, on shared features.

Every rule needs some of the same things (lines, words, paragraphs, n-gram counts). `features_of`
computes them once per document text and caches them on the document, so the chain splits words
once, not once per filter. Words follow spaCy's English tokenizer rules (pipeline/data/words.py),
so the Gopher/C4 numbers agree with datatrove's spaCy-based filters (bench/filters.py measures
the agreement) at a small fraction of the cost.

Thresholds live in the config sections (pipeline/data/config.py) with their sources. Each rule
drops with a named reason (`gopher_short_doc`, `c4_too_few_sentences`, ...). C4 also removes
lines (the paper's line rules), so it changes the text; the features are recomputed after it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from functools import cached_property

import numpy as np

from pipeline.data.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from pipeline.data.document import Document
from pipeline.data.stage import Stage
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
_PUNCT = frozenset(
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»´–—‘’“”„…∶━►、〈〉《》「」【】％（），．１：；？～！"
    + "".join(map(chr, [*range(0, 32), *range(127, 160)]))
).union(TERMINAL_PUNCT)
_SENT_END = frozenset(".!?。！？｡։؟۔।॥")  # tokens after which spaCy's sentencizer starts a sentence
_MULTIPLIERS = np.random.default_rng(0).integers(1, 2**63, size=16, dtype=np.uint64) * np.uint64(
    2
) + np.uint64(1)
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def count_sentences(line: str, tokens: list[str] | None = None) -> int:
    """Sentences in a line as spaCy's sentencizer splits them: a run of end marks followed by a token."""
    tokens = split_words(line) if tokens is None else tokens
    n, after_end = (1 if tokens else 0), False
    for tok in tokens:
        if tok in _SENT_END:
            after_end = True
        elif after_end:
            n, after_end = n + 1, False
    return n


def _duplicates(items: list[str]) -> tuple[int, int]:
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
    """Lazily computed, cached text features; one instance per document text."""

    def __init__(self, text: str, line_tokens: list[list[str]] | None = None):
        self.text = text
        if line_tokens is not None:  # already split (C4 passes on the tokens of the lines it kept)
            self.__dict__["line_tokens"] = line_tokens

    @cached_property
    def line_tokens(self) -> list[list[str]]:
        """Words per line of `lines` (tokens never cross whitespace, so this is one split)."""
        return [split_words(line) for line in self.lines]

    @cached_property
    def words(self) -> list[str]:
        return list(itertools.chain.from_iterable(self.line_tokens))

    @cached_property
    def content_words(self) -> list[str]:
        """Words with at least one character that is not punctuation."""
        return [w for w in self.words if w.isalnum() or not _PUNCT.issuperset(w)]

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


def features_of(doc: Document) -> Features:
    """The document's features, computed once per text (a changed text gets new ones)."""
    feats = doc.features
    if not isinstance(feats, Features) or feats.text is not doc.text:
        feats = doc.features = Features(doc.text)
    return feats


class QualityStage(Stage):
    """A rule set that passes documents from `skip_sources` untouched; subclasses implement `check`."""

    def __init__(self, skip_sources=(), write_scores: bool = False):
        self.skip_sources = frozenset(skip_sources)
        self.write_scores = write_scores

    def process_one(self, doc: Document) -> Document | str:
        if doc.source in self.skip_sources:
            return doc
        return self.check(doc)

    def check(self, doc: Document) -> Document | str:
        raise NotImplementedError

    def _scored(self, doc: Document, scores: dict[str, float]) -> Document:
        if self.write_scores:
            doc.meta.setdefault("scores", {}).update({k: round(v, 4) for k, v in scores.items()})
        return doc


class GopherRepetition(QualityStage):
    """Gopher table A1: repeated lines/paragraphs and n-grams (thresholds in GopherRepetitionConfig)."""

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig, **kw):
        super().__init__(**kw)
        self.cfg = cfg
        self.top = sorted((int(n), f) for n, f in cfg.top_ngram_char_frac.items())
        self.dup = sorted((int(n), f) for n, f in cfg.dup_ngram_char_frac.items())

    def check(self, doc: Document) -> Document | str:
        text, c = doc.text, self.cfg
        if not text:
            return "empty"
        paras = _PARAGRAPHS.split(text.strip())
        n, chars = _duplicates(paras)
        if n / len(paras) > c.dup_para_frac:
            return "gopher_dup_para_frac"
        if chars / len(text) > c.dup_para_char_frac:
            return "gopher_dup_para_char_frac"
        lines = _LINES.split(text)
        n, chars = _duplicates(lines)
        if n / len(lines) > c.dup_line_frac:
            return "gopher_dup_line_frac"
        if chars / len(text) > c.dup_line_char_frac:
            return "gopher_dup_line_char_frac"
        return self._check_ngrams(doc)

    def _check_ngrams(self, doc: Document) -> Document | str:
        feats, size = features_of(doc), len(doc.text)
        for n, frac in self.top:
            if feats.top_ngram_chars(n) / size > frac:
                return f"gopher_top_{n}_gram"
        m = self.dup[0][0] if self.dup else 0
        for n, frac in self.dup:  # a cheap bound from the shortest n-gram's repeats first: most texts pass
            if feats.repeated_ngram_bound(n, m) / size > frac and feats.repeated_ngram_chars(n) / size > frac:
                return f"gopher_dup_{n}_gram"
        return doc


class GopherQuality(QualityStage):
    """Gopher appendix A quality rules (thresholds in GopherQualityConfig)."""

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig, **kw):
        super().__init__(**kw)
        self.cfg, self.stop_words = cfg, frozenset(cfg.stop_words)

    def check(self, doc: Document) -> Document | str:
        c, feats, text = self.cfg, features_of(doc), doc.text
        content = feats.content_words
        if len(content) < c.min_words:
            return "gopher_short_doc"
        if len(content) > c.max_words:
            return "gopher_long_doc"
        mean_len = sum(map(len, content)) / len(content)
        if mean_len < c.min_mean_word_length:
            return "gopher_short_words"
        if mean_len > c.max_mean_word_length:
            return "gopher_long_words"
        n_words = len(feats.words)
        if text.count("#") / n_words > c.max_symbol_word_ratio:
            return "gopher_hash_ratio"
        if (text.count("...") + text.count("…")) / n_words > c.max_symbol_word_ratio:
            return "gopher_ellipsis_ratio"
        return self._check_lines_and_words(doc, feats, mean_len)

    def _check_lines_and_words(self, doc: Document, feats: Features, mean_len: float) -> Document | str:
        c, lines = self.cfg, feats.lines
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_bullet_lines"
        ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ellipsis / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines"
        alpha = sum(1 for w in feats.words if w.isalpha() or any(ch.isalpha() for ch in w)) / len(feats.words)
        if alpha < c.min_alpha_words_ratio:
            return "gopher_alpha_words"
        stops = len(self.stop_words.intersection(feats.words))
        if stops < c.min_stop_words:
            return "gopher_stop_words"
        scores = {"words": len(feats.content_words), "mean_word_length": mean_len, "alpha_words": alpha}
        return self._scored(doc, scores)


class C4Quality(QualityStage):
    """C4's line and page rules (Raffel et al. 2020); keeps the surviving lines as the new text."""

    name = "c4"

    def __init__(self, cfg: C4Config, **kw):
        super().__init__(**kw)
        self.cfg = cfg

    def check(self, doc: Document) -> Document | str:
        feats = features_of(doc)
        kept: list[str] = []
        kept_tokens: list[list[str]] = []
        sentences = 0
        for raw, tokens in zip(feats.lines, feats.line_tokens):
            stripped = raw.strip()
            line = self._clean_line(stripped)
            if line is None:
                continue
            lower = line.lower()
            if self.cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
                return "c4_lorem_ipsum"
            if self.cfg.drop_javascript_lines and "javascript" in lower:
                continue
            if self.cfg.drop_curly_bracket and "{" in line:
                return "c4_curly_bracket"
            if self.cfg.drop_policy_lines and any(p in lower for p in _POLICY):
                continue
            tokens = tokens if line is stripped else split_words(line)  # a citation was cut out
            sentences += count_sentences(line, tokens)
            kept.append(line)
            kept_tokens.append(tokens)
        if sentences < self.cfg.min_sentences:
            return "c4_too_few_sentences"
        return self._scored(self._with_text(doc, kept, kept_tokens), {"c4_sentences": sentences})

    @staticmethod
    def _with_text(doc: Document, kept: list[str], kept_tokens: list[list[str]]) -> Document:
        """The document with the kept lines as its text, its features carried over (no second split)."""
        text = "\n".join(kept).strip()
        if text == doc.text:
            return doc
        out = replace(doc, text=text)
        if len(text) == sum(map(len, kept)) + len(kept) - 1:  # strip() removed nothing: lines line up
            out.features = Features(text, kept_tokens)
        return out

    def _clean_line(self, line: str) -> str | None:
        """The line after the per-line rules, or None when a rule removes it."""
        c = self.cfg
        words = line.split()
        if any(len(w) > c.max_word_length for w in words):
            return None
        if c.remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if c.terminal_punct_lines and (not line.endswith((".", "?", "!", '"', "'")) or line.endswith("...")):
            return None
        return line if len(words) >= c.min_words_per_line else None


class FineWebQuality(QualityStage):
    """FineWeb's three rules: terminal-punctuation lines, duplicated-line characters, list-like pages."""

    name = "fineweb"

    def __init__(self, cfg: FineWebConfig, **kw):
        super().__init__(**kw)
        self.cfg = cfg

    def check(self, doc: Document) -> Document | str:
        c, feats = self.cfg, features_of(doc)
        lines = feats.nonempty_lines
        if not lines:
            return "empty"
        punct = sum(1 for line in lines if line.endswith(TERMINAL_PUNCT)) / len(lines)
        if punct < c.min_line_punct_ratio:
            return "fineweb_line_punct_ratio"
        short = sum(1 for line in lines if len(line) <= c.short_line_chars) / len(lines)
        if short > c.max_short_line_ratio:
            return "fineweb_short_line_ratio"
        dup = _duplicates(lines)[1] / max(len(doc.text) - doc.text.count("\n"), 1)
        if dup > c.max_char_dup_ratio:
            return "fineweb_char_dup_ratio"
        newline_ratio = doc.text.count("\n") / max(len(feats.words), 1)
        if newline_ratio > c.max_newline_word_ratio:
            return "fineweb_list_ratio"
        return self._scored(
            doc, {"line_punct_ratio": punct, "short_line_ratio": short, "char_dup_ratio": dup}
        )
