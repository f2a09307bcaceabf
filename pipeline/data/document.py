"""The unit of data prep (Document) and the counters every stage returns (Counts).

Accounting (DESIGN invariant 1): for a stage, a file or the whole job,
documents in = kept + sum(dropped by reason) + sum(errors by reason). `Counts.total_in`
is that sum, so a test can compare it with the number of documents that went in.
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

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def error(self, reason: str, n: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + n

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
        return self

    @classmethod
    def merge(cls, many: list[Counts]) -> Counts:
        """A new Counts holding the sum of `many`."""
        out = cls()
        for c in many:
            out.add(c)
        return out

    def to_dict(self) -> dict:
        return {
            "in": self.total_in,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "errors": dict(sorted(self.errors.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Counts:
        return cls(kept=int(d["kept"]), dropped=dict(d.get("dropped", {})), errors=dict(d.get("errors", {})))
