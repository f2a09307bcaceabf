"""Cleaning stages: text normalization and document filters, registered by short name.

`FILTERS` maps the short names a YAML config may use (`{name: min_length, min_chars: 200}`)
to Stage classes; nothing is looked up by dotted path. `build_quality` turns the `filters`
config section into the quality chain (pipeline/data/quality.py, langid.py, pii.py). Drop reasons are stable snake_case
nouns because they end up in `stats.json` and `report.json`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace

from pipeline.data.config import CleanConfig, FiltersConfig
from pipeline.data.document import Document
from pipeline.data.stage import Stage

_SPACES = re.compile(r"[ \t\u00a0\f\v]+")  # not \u3000: the ideographic space is part of CJK text
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, no control characters, single spaces, no space at line ends, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


class Normalize(Stage):
    """Whitespace and Unicode normalization (never drops)."""

    name = "normalize"

    def process_one(self, doc: Document) -> Document:
        return replace(doc, text=normalize_text(doc.text))


class MinLength(Stage):
    """Drop documents with fewer than `min_chars` characters (`empty` when there is no text at all)."""

    name = "min_length"

    def __init__(self, min_chars: int = 200):
        self.min_chars = min_chars

    def process_one(self, doc: Document) -> Document | str:
        if not doc.text:
            return "empty"
        return "too_short" if len(doc.text) < self.min_chars else doc


FILTERS: dict[str, type[Stage]] = {"normalize": Normalize, "min_length": MinLength}
"""Short name -> stage class, for configs that list stages by name."""


def build_filters(clean: CleanConfig) -> list[Stage]:
    """The cleaning chain that follows extraction, in order."""
    return [Normalize(), MinLength(clean.min_chars)]


def build_quality(cfg: FiltersConfig) -> list[Stage]:
    """The enabled quality filters in FineWeb's order: langid, Gopher repetition and quality, C4,
    FineWeb, then PII redaction (which never drops)."""
    from pipeline.data.quality import C4Quality, FineWebQuality, GopherQuality, GopherRepetition

    shared = {"skip_sources": cfg.skip_sources, "write_scores": cfg.write_scores}
    stages: list[Stage] = []
    if cfg.langid.enabled:
        from pipeline.data.langid import LangIdFilter

        stages.append(LangIdFilter(cfg.langid, write_scores=cfg.write_scores))
    for section, cls in (
        (cfg.gopher_repetition, GopherRepetition),
        (cfg.gopher_quality, GopherQuality),
        (cfg.c4, C4Quality),
        (cfg.fineweb, FineWebQuality),
    ):
        if section.enabled:
            stages.append(cls(section, **shared))
    if cfg.pii.enabled:
        from pipeline.data.pii import PiiRedactor

        stages.append(PiiRedactor(cfg.pii))
    return stages
