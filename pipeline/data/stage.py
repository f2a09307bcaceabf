"""The stage contract: a batch of documents in, a batch out plus counters (STYLE 3.2).

A stage is plain Python (no Ray, no file I/O), so a test can call it on literals. A subclass
sets `name` and implements `process_one`, which returns the (possibly changed) document to
keep it or a reason string to drop it. An exception on one document is counted under its
class name and logged; it never stops the batch.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from pipeline.data.document import Counts, Document

log = logging.getLogger(__name__)


class Stage:
    """One step of data prep. Subclasses set `name` and implement `process_one` (or `process`)."""

    name: ClassVar[str]

    def process_one(self, doc: Document) -> Document | str:
        """Return the (possibly changed) document to keep it, or a reason string to drop it."""
        raise NotImplementedError

    def process(self, docs: list[Document]) -> tuple[list[Document], Counts]:
        kept: list[Document] = []
        counts = Counts()
        for doc in docs:
            try:
                out = self.process_one(doc)
            except Exception as exc:  # one bad record never kills the job
                counts.error(type(exc).__name__)
                log.warning("%s: error on %s: %s: %s", self.name, doc.id, type(exc).__name__, exc)
                continue
            if isinstance(out, str):
                counts.drop(out)
            else:
                kept.append(out)
        counts.kept = len(kept)
        return kept, counts


def run_stages(
    stages: list[Stage], docs: list[Document], per_stage: dict[str, Counts] | None = None
) -> tuple[list[Document], Counts]:
    """Run `docs` through `stages` in order; returns survivors and the chain's summed counters.

    The chain's counters satisfy in = kept + dropped + errors with in = len(docs). When
    `per_stage` is given, each stage's own counters are added into it under the stage name, so
    calling this once per batch accumulates the per-stage funnel of a whole file.
    """
    total = Counts()
    for stage in stages:
        docs, counts = stage.process(docs)
        if per_stage is not None:
            per_stage.setdefault(stage.name, Counts()).add(counts)
        total.add(Counts(dropped=counts.dropped, errors=counts.errors, noted=counts.noted))
    total.kept = len(docs)
    return docs, total
