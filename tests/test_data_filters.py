"""Cleaning stages and the stage contract (pipeline/data/filters.py, stage.py, document.py)."""

from __future__ import annotations

import logging
from dataclasses import fields

import pytest
from helpers import assert_accounting

from pipeline.data.config import CleanConfig, FiltersConfig
from pipeline.data.document import Counts, Document
from pipeline.data.filters import FILTERS, MinLength, Normalize, build_filters, build_quality, normalize_text
from pipeline.data.stage import Stage, run_stages


def docs_of(*texts: str) -> list[Document]:
    return [Document(f"t/{i}", t, "test") for i, t in enumerate(texts)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a  \t b\u00a0c  ", "a b c"),
        ("para one\n\n\n\n  para two  \n", "para one\n\npara two"),
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),  # NFC: e + combining acute -> é
        ("line\r\nnext\rlast\x00\x07", "line\nnext\nlast"),
        ("中文\u3000全角", "中文\u3000全角"),  # the ideographic space belongs to the text
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_stage_never_drops():
    docs = docs_of("  x  ", "", "y\n\n\n\nz")
    out, counts = Normalize().process(docs)
    assert_accounting(docs, out, counts)
    assert [d.text for d in out] == ["x", "", "y\n\nz"]


def test_min_length_reasons():
    docs = docs_of("a" * 10, "", "b" * 9, "c" * 50)
    out, counts = MinLength(min_chars=10).process(docs)
    assert_accounting(docs, out, counts)
    assert [d.id for d in out] == ["t/0", "t/3"]
    assert counts.dropped == {"empty": 1, "too_short": 1}


def test_registry_and_chain_from_config(tmp_path):
    from pipeline.data.decontam import EvalSetConfig
    from pipeline.data.langid import bundled_model_path

    chain = build_filters(CleanConfig(min_chars=5))
    assert [s.name for s in chain] == ["normalize", "min_length"] and chain[1].min_chars == 5
    # one registry entry per `filters` section that can be enabled, each building its own stage
    sections = [f.name for f in fields(FiltersConfig) if hasattr(getattr(FiltersConfig(), f.name), "enabled")]
    assert sorted(FILTERS) == sorted(sections)
    cfg = FiltersConfig()
    for name in FILTERS:
        getattr(cfg, name).enabled = True
    cfg.quality_model.model, cfg.quality_model.positive_label = bundled_model_path(), "en"
    (tmp_path / "eval.jsonl").write_text(
        '{"text": "an evaluation item long enough to be indexed by its n-grams"}\n'
    )
    cfg.decontam.eval_sets = [EvalSetConfig("e", tmp_path / "eval.jsonl")]
    assert [s.name for s in build_quality(cfg)] == list(FILTERS)


class Explodes(Stage):
    name = "explodes"

    def process_one(self, doc: Document) -> Document:
        if "boom" in doc.text:
            raise ValueError("cannot handle boom")
        return doc


def test_an_exception_is_a_counted_error_not_a_crash(caplog):
    docs = docs_of("fine", "boom here", "also fine")
    with caplog.at_level(logging.WARNING):
        out, counts = Explodes().process(docs)
    assert_accounting(docs, out, counts)
    assert counts.errors == {"ValueError": 1}
    assert "t/1" in caplog.text and "cannot handle boom" in caplog.text


def test_run_stages_accounts_per_stage_and_in_total():
    docs = docs_of("  ok text that is long enough  ", "boom", "tiny", "another long enough text")
    stages = [Normalize(), Explodes(), MinLength(min_chars=10)]
    per_stage: dict[str, Counts] = {}
    out, total = run_stages(stages, docs, per_stage)
    assert_accounting(docs, out, total)
    assert total.dropped == {"too_short": 1} and total.errors == {"ValueError": 1}
    assert list(per_stage) == ["normalize", "explodes", "min_length"]
    assert [c.total_in for c in per_stage.values()] == [4, 4, 3]
    run_stages(stages, docs_of("second batch with enough text"), per_stage)  # accumulates
    assert per_stage["min_length"].kept == 3 and per_stage["normalize"].total_in == 5


def test_counts_merge_and_round_trip():
    a = Counts(kept=2, dropped={"too_short": 1}, errors={"malformed_xml": 1})
    b = Counts(kept=1, dropped={"too_short": 2, "redirect": 3})
    m = Counts.merge([a, b])
    assert (m.kept, m.dropped, m.errors, m.total_in) == (
        3,
        {"too_short": 3, "redirect": 3},
        {"malformed_xml": 1},
        10,
    )
    assert Counts.from_dict(m.to_dict()) == m
    assert m.to_dict()["in"] == 10
