"""The unit of data prep (Document) and the counters every stage returns (Counts).

Accounting (DESIGN invariant 1): for a stage, a file or the whole job,
documents in = kept + sum(dropped by reason) + sum(errors by reason). `Counts.total_in`
is that sum, so a test can compare it with the number of documents that went in. Two more
tallies ride along, outside that sum: `noted` (records kept after a repair, or flagged for a
reader: replaced surrogates, a stripped BOM, markup-leak lines) and `languages` (documents in,
kept and passed without the rule, per language, from the per-language quality rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    id: str
    """Stable id derived from source and position, e.g. `enwiki/12345`."""
    text: str
    source: str
    """Where the document comes from (e.g. "wikipedia")."""
    meta: dict = field(default_factory=dict)
    """Title, url, timestamp, language, scores... (JSON-safe values only)."""
    features: object = field(default=None, init=False, repr=False, compare=False)
    """Per-document text features shared by the quality filters (quality.features_of); never written."""

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, row: dict) -> Document:
        return cls(id=row["id"], text=row["text"], source=row.get("source", ""), meta=row.get("meta") or {})


@dataclass
class Counts:
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Documents removed on purpose, by stable snake_case reason (`too_short`, `redirect`)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Records that could not be processed, by reason (`malformed_xml`, `ValueError`)."""
    noted: dict[str, int] = field(default_factory=dict)
    """Events that drop nothing, by name (`lone_surrogate`, `bom`, `markup_leak_lines`): not in `total_in`."""
    languages: dict[str, dict[str, int]] = field(default_factory=dict)
    """language -> {"in", "kept", "not_applied"}: a per-language rule's view of its documents."""

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def error(self, reason: str, n: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + n

    def note(self, event: str, n: int = 1) -> None:
        if n:
            self.noted[event] = self.noted.get(event, 0) + n

    def tally_language(self, language: str, key: str, n: int = 1) -> None:
        tally = self.languages.setdefault(language, {"in": 0, "kept": 0, "not_applied": 0})
        tally[key] = tally.get(key, 0) + n

    @property
    def total_in(self) -> int:
        return self.kept + sum(self.dropped.values()) + sum(self.errors.values())

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def add(self, other: Counts) -> Counts:
        """Add `other` into self (counters of the same stage over more batches or files); returns self."""
        self.kept += other.kept
        for reason, n in other.dropped.items():
            self.drop(reason, n)
        for reason, n in other.errors.items():
            self.error(reason, n)
        for event, n in other.noted.items():
            self.note(event, n)
        for lang, tally in other.languages.items():
            for key, n in tally.items():
                self.tally_language(lang, key, n)
        return self

    @classmethod
    def merge(cls, many: list[Counts]) -> Counts:
        """A new Counts holding the sum of `many`."""
        out = cls()
        for c in many:
            out.add(c)
        return out

    def to_dict(self) -> dict:
        """JSON form (stats.json, report.json); `noted` and `languages` only when they hold something."""
        out = {
            "in": self.total_in,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "errors": dict(sorted(self.errors.items())),
        }
        if self.noted:
            out["noted"] = dict(sorted(self.noted.items()))
        if self.languages:
            out["languages"] = {k: dict(v) for k, v in sorted(self.languages.items())}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Counts:
        return cls(
            kept=int(d["kept"]),
            dropped=dict(d.get("dropped", {})),
            errors=dict(d.get("errors", {})),
            noted=dict(d.get("noted", {})),
            languages={k: dict(v) for k, v in d.get("languages", {}).items()},
        )
