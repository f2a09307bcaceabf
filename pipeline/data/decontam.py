"""Decontamination: drop (or flag) training documents that share word n-grams with evaluation sets.

The evaluation sets are local JSONL/Parquet files whose text fields the config names
(`{name: mmlu, path: evals/mmlu.jsonl, fields: [question, choices]}`). `build_index` splits every
field value into language-aware units (pipeline/data/units.py: words, or single characters of
Chinese/Japanese/Thai), hashes each window of `ngram` units (13 by default, as the GPT-3 and
legacy NeMo Curator decontaminators do) and keeps the sorted hashes with the id of the set they
came from. A text shorter than `ngram` units but at least `min_ngram` long is indexed by its
`min_ngram`-grams, so short questions are still caught (a document is then looked up with two
window lengths, not one per text length); shorter ones are counted as `too_short` and skipped. Windows made
only of numbers and lone letters are not indexed (numbered lists and alphabet indexes would match any
counting run or Wikipedia list page).

The index is built once per job, on the driver (`filters.SHARED`), and the clean step hands it
to every task through `Job.share` (numpy arrays travel without copies); `Decontaminate`, the
`filters.decontam` entry of `filters.FILTERS` (after the learned quality score, before dedup),
is the per-document stage that uses it. A document matches a set when it shares at least
`min_matches` distinct n-grams with it; it is then dropped as `contaminated` or kept with
`meta["contamination"] = {set: n-grams}`. The stage notes matched documents per evaluation set
(`noted["matched:<set>"]`), so the report has them per set and per input file.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash

from pipeline.data.document import Counts, Document
from pipeline.data.records import field_texts, iter_records
from pipeline.data.stage import Stage
from pipeline.data.units import word_units
from pipeline.data.words import UNSPACED_RUN
from pipeline.errors import ConfigError, DataError
from pipeline.io import sha256_file

log = logging.getLogger(__name__)

_PRIME = np.uint64(0x100000001B3)  # odd multiplier of the polynomial window hash (wraps mod 2^64)
_LENGTH_SALT = np.uint64(0x9E3779B97F4A7C15)  # keeps windows of different lengths apart
INDEX_VERSION = 2
"""Bump when the units or the indexed windows change (2: words.py's split, alphabet runs not indexed)."""
MATCHED = "matched:"
"""Prefix of the stage's `noted` counters: `matched:<set>` = documents that matched that set."""


@dataclass
class EvalSetConfig:
    name: str
    """Label of the set in `meta["contamination"]` and in the report (e.g. "mmlu")."""
    path: Path
    """A local `.jsonl` (optionally `.gz`/`.zst`/`.bz2`), `.json` array or `.parquet` file."""
    fields: list[str] = field(default_factory=lambda: ["text"])
    """Record fields whose text is indexed, each on its own; dotted names walk into objects and
    lists (`choices`, `instances.output`)."""


@dataclass
class DecontamConfig:
    """Remove benchmark text from training data (after the learned quality score, before dedup; every
    source, `filters.skip_sources` included)."""

    enabled: bool = False
    eval_sets: list[EvalSetConfig] = field(default_factory=list)
    ngram: int = 13
    """Units per n-gram (words; characters for Chinese/Japanese/Thai). 13: GPT-3, NeMo Curator."""
    min_ngram: int = 8
    """An evaluation text shorter than `ngram` units but at least this long is indexed by its
    `min_ngram`-grams instead; shorter texts cannot be matched without false hits (`too_short`)."""
    min_matches: int = 1
    """Distinct n-grams a document must share with one set to count as contaminated by it."""
    action: Literal["drop", "flag"] = "drop"
    """drop: remove the document (reason `contaminated`); flag: keep it and write `meta["contamination"]`."""

    def validate(self) -> None:
        if self.ngram < 1 or not 1 <= self.min_ngram <= self.ngram:
            raise ConfigError(
                "ngram", f"need ngram >= 1 and 1 <= min_ngram <= ngram, got {self.ngram}, {self.min_ngram}"
            )
        if self.min_matches < 1:
            raise ConfigError("min_matches", f"must be >= 1, got {self.min_matches}")
        if self.enabled and not self.eval_sets:
            raise ConfigError("eval_sets", "decontam is enabled but lists no evaluation set")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ConfigError("eval_sets", f"set names must be unique, got {names}")
        for i, s in enumerate(self.eval_sets):
            if not s.fields:
                raise ConfigError(f"eval_sets[{i}].fields", "must name at least one field")
            if self.enabled and not Path(s.path).is_file():
                raise ConfigError(f"eval_sets[{i}].path", f"file not found: {s.path}")


def unit_hashes(text: str) -> np.ndarray:
    """uint64 hash of each unit of `text` (xxh3: the same in every process, unlike hash())."""
    return hash_units(word_units(text))


def hash_units(units: list[str]) -> np.ndarray:
    """uint64 xxh3 hash of each unit."""
    return np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, units)), np.uint64, len(units))


def window_hashes(units: np.ndarray, length: int) -> np.ndarray:
    """Hash of every window of `length` consecutive unit hashes (empty when there are fewer units)."""
    n = len(units) - length + 1
    if n <= 0:
        return np.empty(0, np.uint64)
    h = np.full(n, (length * int(_LENGTH_SALT)) % 2**64, np.uint64)
    for k in range(length):
        h = h * _PRIME + units[k : k + n]
    return h


def _filler(unit: str) -> bool:
    """A number, or a lone letter of a spaced script ("a", "B"; not a Chinese character)."""
    return unit.isdigit() or (len(unit) == 1 and not UNSPACED_RUN.match(unit))


def informative(units: list[str], length: int) -> np.ndarray:
    """Per window of `length` units: False when every unit is filler. Counting runs ("1 2 3 ... 13"),
    tables of figures and alphabet indexes ("A B C ... M", on every Wikipedia list page) are everywhere
    on the web and say nothing about a benchmark."""
    filler = np.fromiter(map(_filler, units), np.int64, len(units))
    if len(filler) < length:
        return np.empty(0, bool)
    run = np.concatenate([[0], np.cumsum(filler)])
    return (run[length:] - run[:-length]) < length


@dataclass(frozen=True)
class NgramIndex:
    """Sorted n-gram hashes of the evaluation sets; `set_ids[i]` is the set of `keys[i]`."""

    keys: np.ndarray
    set_ids: np.ndarray
    names: tuple[str, ...]
    lengths: tuple[int, ...]
    """Window lengths to look up: `ngram`, and `min_ngram` when short texts were indexed."""
    stats: dict
    """Per set: records, texts, too_short, ngrams, file sha256 (for the report and the config hash)."""

    def matches(self, text: str) -> dict[str, int]:
        """{set name: distinct n-grams `text` shares with it}, only the sets it shares any with."""
        units = unit_hashes(text)
        h = np.concatenate([window_hashes(units, length) for length in self.lengths])
        if not len(h) or not len(self.keys):
            return {}
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        hit = np.unique(h[self.keys[pos] == h])  # almost always empty: one vectorized lookup per document
        found: dict[str, int] = {}
        for key in hit:
            a, b = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
            for sid in set(self.set_ids[a:b].tolist()):
                found[self.names[sid]] = found.get(self.names[sid], 0) + 1
        return found


def build_index(cfg: DecontamConfig) -> NgramIndex:
    """Read every evaluation set and index its n-grams; DataError/ConfigError naming a bad file or field."""
    keys, ids, lengths, stats = [], [], {cfg.ngram}, {}
    for sid, spec in enumerate(cfg.eval_sets):
        set_keys, st = _index_set(spec, cfg)
        lengths.update(st.pop("lengths"))
        keys.append(set_keys)
        ids.append(np.full(len(set_keys), sid, np.uint16))
        stats[spec.name] = st
        log.info(
            "decontam: %s: %d texts, %d n-grams, %d too short",
            spec.name,
            st["texts"],
            st["ngrams"],
            st["too_short"],
        )
    all_keys = np.concatenate(keys) if keys else np.empty(0, np.uint64)
    all_ids = np.concatenate(ids) if ids else np.empty(0, np.uint16)
    order = np.lexsort((all_ids, all_keys))  # by key, then set
    return NgramIndex(
        all_keys[order], all_ids[order], tuple(s.name for s in cfg.eval_sets), tuple(sorted(lengths)), stats
    )


def _index_set(spec: EvalSetConfig, cfg: DecontamConfig) -> tuple[np.ndarray, dict]:
    parts: list[np.ndarray] = []
    st = {"records": 0, "texts": 0, "too_short": 0, "without_fields": 0, "lengths": set()}
    bad: list[str] = []
    for rec in iter_records(spec.path):
        if isinstance(rec, str):
            bad.append(rec)
            continue
        st["records"] += 1
        texts = field_texts(rec, spec.fields)
        st["without_fields"] += not texts
        for text in texts:
            st["texts"] += 1
            words = word_units(text)
            units = hash_units(words)
            length = cfg.ngram if len(units) >= cfg.ngram else cfg.min_ngram
            if len(units) < length:
                st["too_short"] += 1
                continue
            st["lengths"].add(length)
            parts.append(window_hashes(units, length)[informative(words, length)])
    if bad:  # a damaged evaluation set would silently let its text through
        raise DataError(f"decontam set {spec.name!r}: {len(bad)} unreadable records, first: {bad[0]}")
    if st["records"] and not st["texts"]:
        raise ConfigError(
            f"filters.decontam.eval_sets.{spec.name}.fields",
            f"no record of {spec.path} has any of {spec.fields}",
        )
    keys = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
    st.update(ngrams=int(len(keys)), sha256=sha256_file(spec.path), path=str(spec.path))
    return keys, st


def index_fingerprint(cfg: DecontamConfig) -> dict:
    """What decides the decontam stage's output: its code version, settings and the evaluation files' contents."""
    return {
        "version": INDEX_VERSION,
        "cfg": cfg,
        "files": {s.name: sha256_file(s.path) for s in cfg.eval_sets},
    }


class Decontaminate(Stage):
    """Drop or flag documents sharing n-grams with an evaluation set (see the module docstring)."""

    name = "decontam"

    def __init__(self, cfg: DecontamConfig, index: NgramIndex):
        self.cfg, self.index = cfg, index
        self._matched: Counter = Counter()

    def process_one(self, doc: Document) -> Document | str:
        found = {s: n for s, n in self.index.matches(doc.text).items() if n >= self.cfg.min_matches}
        if not found:
            return doc
        self._matched.update(found.keys())
        if self.cfg.action == "drop":
            return "contaminated"
        doc.meta["contamination"] = found
        return doc

    def process(self, docs: list[Document]) -> tuple[list[Document], Counts]:
        """Stage.process, plus `noted["matched:<set>"]`: documents that matched each evaluation set
        (a document can match several), which the report sums per set and input file."""
        self._matched.clear()
        kept, counts = super().process(docs)
        for name in sorted(self._matched):
            counts.note(MATCHED + name, self._matched[name])
        return kept, counts
