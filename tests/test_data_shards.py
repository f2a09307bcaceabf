"""Cleaned-shard writer (pipeline/data/shards.py): one input -> .jsonl.zst + stats.json, atomic, resumable."""

from __future__ import annotations

import pytest
from helpers import ARTICLES, assert_accounting, make_dump

from pipeline.data.config import CleanConfig, DataConfig
from pipeline.data.shards import clean_file, shard_paths
from pipeline.errors import DataError
from pipeline.io import read_jsonl_zst

PAGES = [
    *ARTICLES,
    ("Stub", 0, 6, "Too short."),
    ("R", 0, 7, "#REDIRECT [[Article 1]]"),
    ("Talk:X", 1, 8, "x"),
]


def run(src, out, cfg_hash="h1", clean=None, max_error_fraction=0.01):
    cfg = DataConfig(
        inputs=[str(src)],
        output_dir=out,
        format="wikipedia",
        steps=["clean"],
        max_error_fraction=max_error_fraction,
        clean=clean or CleanConfig(min_chars=100),
    )
    return clean_file(src, out, cfg, cfg_hash)


@pytest.fixture
def dump(tmp_path):
    path = tmp_path / "in" / "testwiki-pages.xml"
    path.parent.mkdir()
    path.write_text(make_dump(PAGES))
    return path


def test_shard_rows_and_stats(dump, tmp_path):
    out = tmp_path / "cleaned"
    stats = run(dump, out)
    data, stats_path = shard_paths(out, dump)
    assert data.name == "testwiki-pages.jsonl.zst" and stats_path.is_file()
    rows = list(read_jsonl_zst(data))
    assert [r["id"] for r in rows] == [f"testwiki/{i}" for i in range(1, 6)]
    assert set(rows[0]) == {"id", "text", "source", "meta"} and rows[0]["meta"]["title"] == "Article 1"
    assert_accounting(len(PAGES), rows, stats["totals"])
    assert stats["totals"]["dropped"] == {"too_short": 1, "redirect": 1, "not_main_namespace": 1}
    assert [c["name"] for c in stats["stages"]] == ["read", "wikitext", "normalize", "min_length"]
    for c in stats["stages"]:
        assert c["in"] == c["kept"] + sum(c["dropped"].values()) + sum(c["errors"].values()), c["name"]
    assert stats["bytes_out"] == data.stat().st_size and stats["skipped"] is False


def test_finished_shard_is_skipped_unless_config_changed(dump, tmp_path):
    out = tmp_path / "cleaned"
    run(dump, out)
    data, _ = shard_paths(out, dump)
    before = data.stat().st_mtime_ns
    assert run(dump, out)["skipped"] is True and data.stat().st_mtime_ns == before
    redone = run(dump, out, cfg_hash="h2", clean=CleanConfig(min_chars=10))
    assert redone["skipped"] is False and redone["totals"]["kept"] == 6


def test_too_many_errors_fail_the_shard_and_write_nothing(tmp_path):
    src = tmp_path / "notes.xml"
    src.write_text("just some notes, not a dump\n")
    out = tmp_path / "cleaned"
    with pytest.raises(DataError, match=r"notes\.xml: 1 of 1 records could not be read \(not_xml 1\)"):
        run(src, out)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_few_errors_under_the_limit_are_counted(dump, tmp_path):
    bad = dump.with_name("testwiki-bad.xml")
    bad.write_text(make_dump(PAGES).replace("<title>Talk:X</title>", "<title>Talk:X</tilte>"))
    stats = run(bad, tmp_path / "cleaned", max_error_fraction=0.5)
    assert stats["totals"]["errors"] == {"malformed_xml": 1} and stats["totals"]["kept"] == 5
    assert stats["totals"]["in"] == len(PAGES)
