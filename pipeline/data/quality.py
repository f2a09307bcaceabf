"""Quality rules per language: Gopher repetition, Gopher quality, C4 and FineWeb, as Stages.

Each rule reads the settings of the document's language (`meta["language"]`, set by language ID;
`filters.default_language` when a document has none) from its config section's `languages`
table, the way FineWeb-2 adapts these rules per language. A language without an entry passes
the rule untouched: the rule is not applied to it, and the stage's counters say so per language
(`Counts.languages[lang]["not_applied"]`), so the report can list it. Words come from that
language's splitter (pipeline/data/features.py, words.py), so Chinese is measured in words,
not in whitespace chunks.

Thresholds and their sources live in the config sections (pipeline/data/config.py). Each rule
drops with a named reason (`gopher_short_doc`, `c4_too_few_sentences`, ...). C4 also removes
lines (the paper's line rules), so it changes the text; the features are recomputed after it.
"""

from __future__ import annotations

import re
from dataclasses import replace

from pipeline.data.config import C4Rules, FineWebRules, GopherQualityRules, GopherRepetitionRules
from pipeline.data.document import Counts, Document
from pipeline.data.features import (
    PUNCT,
    TERMINAL_PUNCT,
    Features,
    count_sentences,
    duplicates,
    features_of,
)
from pipeline.data.stage import Stage
from pipeline.data.words import SEGMENTERS, split_words

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
UNKNOWN = "unknown"
"""The language tally of documents with no language (and no `default_language`)."""


class QualityStage(Stage):
    """A rule set with one settings entry per language. Documents from `skip_sources`, and those whose
    language has no entry, pass untouched; subclasses implement `check(doc, rules, language)`."""

    def __init__(self, languages: dict, skip_sources=(), write_scores: bool = False, default_language=None):
        self.languages = dict(languages)
        self.skip_sources = frozenset(skip_sources)
        self.write_scores = write_scores
        self.default_language = default_language

    def language_of(self, doc: Document) -> str:
        """The language whose settings apply to `doc` (UNKNOWN when it has none)."""
        return doc.meta.get("language") or self.default_language or UNKNOWN

    def process_one(self, doc: Document) -> Document | str:
        if doc.source in self.skip_sources:
            return doc
        lang = self.language_of(doc)
        rules = self.languages.get(lang)
        return doc if rules is None else self.check(doc, rules, lang)

    def process(self, docs: list[Document]) -> tuple[list[Document], Counts]:
        """Stage.process, plus per-language tallies (in, kept, not_applied) of the rated documents."""
        kept, counts = super().process(docs)
        for doc, n in [(d, "in") for d in docs] + [(d, "kept") for d in kept]:
            if doc.source not in self.skip_sources:
                lang = self.language_of(doc)
                counts.tally_language(lang, n)
                if n == "in" and lang not in self.languages:
                    counts.tally_language(lang, "not_applied")
        return kept, counts

    def check(self, doc: Document, rules, language: str) -> Document | str:
        raise NotImplementedError

    def _scored(self, doc: Document, scores: dict[str, float]) -> Document:
        if self.write_scores:
            doc.meta.setdefault("scores", {}).update({k: round(v, 4) for k, v in scores.items()})
        return doc


class GopherRepetition(QualityStage):
    """Gopher table A1: repeated lines/paragraphs and word n-grams (settings: GopherRepetitionRules)."""

    name = "gopher_repetition"

    def check(self, doc: Document, rules: GopherRepetitionRules, language: str) -> Document | str:
        text, c = doc.text, rules
        if not text:
            return "empty"
        paras = _PARAGRAPHS.split(text.strip())
        n, chars = duplicates(paras)
        if n / len(paras) > c.dup_para_frac:
            return "gopher_dup_para_frac"
        if chars / len(text) > c.dup_para_char_frac:
            return "gopher_dup_para_char_frac"
        lines = _LINES.split(text)
        n, chars = duplicates(lines)
        if n / len(lines) > c.dup_line_frac:
            return "gopher_dup_line_frac"
        if chars / len(text) > c.dup_line_char_frac:
            return "gopher_dup_line_char_frac"
        return self._check_ngrams(doc, rules, language)

    @staticmethod
    def _check_ngrams(doc: Document, rules: GopherRepetitionRules, language: str) -> Document | str:
        feats, size = features_of(doc, language), len(doc.text)
        for n, frac in sorted((int(n), f) for n, f in rules.top_ngram_char_frac.items()):
            if feats.top_ngram_chars(n) / size > frac:
                return f"gopher_top_{n}_gram"
        dup = sorted((int(n), f) for n, f in rules.dup_ngram_char_frac.items())
        m = dup[0][0] if dup else 0
        for n, frac in dup:  # a cheap bound from the shortest n-gram's repeats first: most texts pass
            if feats.repeated_ngram_bound(n, m) / size > frac and feats.repeated_ngram_chars(n) / size > frac:
                return f"gopher_dup_{n}_gram"
        return doc


class GopherQuality(QualityStage):
    """Gopher appendix A quality rules (settings: GopherQualityRules)."""

    name = "gopher_quality"

    def __init__(self, languages: dict[str, GopherQualityRules], **kw):
        super().__init__(languages, **kw)
        self.stop_words = {lang: frozenset(r.stop_words) for lang, r in self.languages.items()}

    def check(self, doc: Document, rules: GopherQualityRules, language: str) -> Document | str:
        c, feats, text = rules, features_of(doc, language), doc.text
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
        return self._check_lines_and_words(doc, feats, rules, language, mean_len)

    def _check_lines_and_words(
        self, doc: Document, feats: Features, c: GopherQualityRules, language: str, mean_len: float
    ) -> Document | str:
        lines = feats.lines
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_bullet_lines"
        ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ellipsis / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines"
        words = feats.content_words if c.alpha_words_of == "words" else feats.words
        alpha = sum(1 for w in words if w.isalpha() or any(ch.isalpha() for ch in w)) / len(words)
        if alpha < c.min_alpha_words_ratio:
            return "gopher_alpha_words"
        if len(self.stop_words[language].intersection(feats.words)) < c.min_stop_words:
            return "gopher_stop_words"
        scores = {"words": len(feats.content_words), "mean_word_length": mean_len, "alpha_words": alpha}
        return self._scored(doc, scores)


class C4Quality(QualityStage):
    """C4's line and page rules (Raffel et al. 2020); keeps the surviving lines as the new text."""

    name = "c4"

    def check(self, doc: Document, rules: C4Rules, language: str) -> Document | str:
        feats = features_of(doc, language)
        kept: list[str] = []
        kept_tokens: list[list[str]] = []
        sentences = 0
        for raw, tokens in zip(feats.lines, feats.line_tokens):
            stripped = raw.strip()
            line = self._clean_line(stripped, tokens, rules, language)
            if line is None:
                continue
            lower = line.lower()
            if rules.drop_lorem_ipsum and "lorem ipsum" in lower:
                return "c4_lorem_ipsum"
            if rules.drop_javascript_lines and "javascript" in lower:
                continue
            if rules.drop_curly_bracket and "{" in line:
                return "c4_curly_bracket"
            if rules.drop_policy_lines and any(p in lower for p in _POLICY):
                continue
            tokens = tokens if line is stripped else split_words(line, language)  # a citation was cut out
            sentences += count_sentences(line, tokens)
            kept.append(line)
            kept_tokens.append(tokens)
        if sentences < rules.min_sentences:
            return "c4_too_few_sentences"
        out = self._with_text(doc, kept, kept_tokens, language)
        return self._scored(out, {"c4_sentences": sentences})

    @staticmethod
    def _with_text(doc: Document, kept: list[str], kept_tokens: list[list[str]], language: str) -> Document:
        """The document with the kept lines as its text, its features carried over (no second split)."""
        text = "\n".join(kept).strip()
        if text == doc.text:
            return doc
        out = replace(doc, text=text)
        if len(text) == sum(map(len, kept)) + len(kept) - 1:  # strip() removed nothing: lines line up
            out.features = Features(text, language, kept_tokens)
        return out

    @staticmethod
    def _clean_line(line: str, tokens: list[str], c: C4Rules, language: str) -> str | None:
        """The line after the per-line rules, or None when a rule removes it. Words are whitespace
        chunks (the paper's), or the segmenter's non-punctuation words for unspaced languages."""
        if language in SEGMENTERS:
            words = [t for t in tokens if t.isalnum() or not PUNCT.issuperset(t)]
        else:
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

    def check(self, doc: Document, rules: FineWebRules, language: str) -> Document | str:
        c, feats = rules, features_of(doc, language)
        lines = feats.nonempty_lines
        if not lines:
            return "empty"
        punct = sum(1 for line in lines if line.endswith(TERMINAL_PUNCT)) / len(lines)
        if punct < c.min_line_punct_ratio:
            return "fineweb_line_punct_ratio"
        short = sum(1 for line in lines if len(line) <= c.short_line_chars) / len(lines)
        if short > c.max_short_line_ratio:
            return "fineweb_short_line_ratio"
        dup = duplicates(lines)[1] / max(len(doc.text) - doc.text.count("\n"), 1)
        if dup > c.max_char_dup_ratio:
            return "fineweb_char_dup_ratio"
        newline_ratio = doc.text.count("\n") / max(len(feats.words), 1)
        if newline_ratio > c.max_newline_word_ratio:
            return "fineweb_list_ratio"
        return self._scored(
            doc, {"line_punct_ratio": punct, "short_line_ratio": short, "char_dup_ratio": dup}
        )
