"""Cleaning stages (normalization, minimum length) and the registry of quality filters.

`FILTERS` maps each section name of the `filters` config (`filters.gopher_quality`, ...) to the
function that builds its stage, in the order the chain runs them (FineWeb's, then the learned
quality score and decontamination); `build_quality` builds the enabled ones. A stage that needs a
read-only object built once per job (decontamination's n-gram index) names its builder in
`SHARED`: the clean step builds those on the driver and shares them with every task
(`Job.share`), and each builder of FILTERS receives them. Adding a filter takes its module, its
config section and one line here; nothing is looked up by dotted path. Drop reasons are stable snake_case nouns because they end up
in `stats.json` and `report.json`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import replace

from pipeline.data.config import CleanConfig, FiltersConfig
from pipeline.data.decontam import Decontaminate, build_index
from pipeline.data.document import Document
from pipeline.data.langid import LangIdFilter
from pipeline.data.pii import PiiRedactor
from pipeline.data.quality import C4Quality, FineWebQuality, GopherQuality, GopherRepetition
from pipeline.data.quality_model import QualityModelFilter
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


def build_filters(clean: CleanConfig) -> list[Stage]:
    """The cleaning chain that follows extraction, in order."""
    return [Normalize(), MinLength(clean.min_chars)]


def _rules(cls) -> Callable[[FiltersConfig, Mapping], Stage]:
    """Builder of a per-language rule stage from its section (the section's name is the stage's)."""

    def build(cfg: FiltersConfig, shared: Mapping) -> Stage:
        section = getattr(cfg, cls.name)
        common = {"skip_sources": cfg.skip_sources, "write_scores": cfg.write_scores}
        return cls(section.languages, default_language=cfg.default_language, **common)

    return build


FILTERS: dict[str, Callable[[FiltersConfig, Mapping], Stage]] = {
    "langid": lambda cfg, shared: LangIdFilter(cfg.langid, write_scores=cfg.write_scores),
    "gopher_repetition": _rules(GopherRepetition),
    "gopher_quality": _rules(GopherQuality),
    "c4": _rules(C4Quality),
    "fineweb": _rules(FineWebQuality),
    "pii": lambda cfg, shared: PiiRedactor(cfg.pii),  # replaces, never drops
    "quality_model": lambda cfg, shared: QualityModelFilter(cfg.quality_model, cfg.skip_sources),
    "decontam": lambda cfg, shared: Decontaminate(cfg.decontam, shared["decontam"]),
}
"""`filters` section name -> builder of its stage from (the section's config, the job's shared
objects), in chain order: FineWeb's (langid, Gopher repetition, Gopher quality, C4, FineWeb, then
PII redaction), then DESIGN's learned quality score and decontamination."""

SHARED: dict[str, Callable[[FiltersConfig], object]] = {
    "decontam": lambda cfg: build_index(cfg.decontam),
}
"""`filters` section name -> builder of the read-only object its stage needs, built once per job."""


def build_shared(cfg: FiltersConfig) -> dict[str, object]:
    """The shared objects of the enabled sections of `cfg` (the clean step puts them in the object store)."""
    return {name: build(cfg) for name, build in SHARED.items() if getattr(cfg, name).enabled}


def build_quality(cfg: FiltersConfig, shared: Mapping | None = None) -> list[Stage]:
    """The enabled filters of `cfg`, in FILTERS order; `shared` as `build_shared` makes it (built
    here when None, as a test or a single process does)."""
    shared = build_shared(cfg) if shared is None else shared
    return [build(cfg, shared) for name, build in FILTERS.items() if getattr(cfg, name).enabled]
