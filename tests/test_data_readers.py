"""Wikipedia XML reader (pipeline/data/readers.py): real dumps, then damaged inputs built here."""

from __future__ import annotations

import bz2
import logging

import pytest
from helpers import ARTICLES, assert_accounting, make_dump

from pipeline.data.readers import WikipediaReader, input_stem, page_url, read_siteinfo
from pipeline.errors import DataError

WIKI = {  # file -> (records, kept, dropped); from SOURCES.md: pages, ns-0 pages, redirects
    "enwiki-pages-articles1-p10p30302-shortened.xml.bz2": (
        206,
        98,  # 106 articles, of which 8 are disambiguation pages ({{disambiguation}}, {{geodis}})
        {"not_main_namespace": 1, "redirect": 99, "disambiguation": 8},
    ),
    "enwiki-table-markup.xml.bz2": (5, 5, {}),
    "ltgwiki-pages-articles.xml.bz2": (2004, 903, {"not_main_namespace": 954, "redirect": 147}),
    "zhwiki-test-pages.xml": (33, 23, {"not_main_namespace": 10}),
}


@pytest.mark.parametrize("name", sorted(WIKI))
def test_counts_on_real_dumps(raw_samples, name):
    records, kept, dropped = WIKI[name]
    reader = WikipediaReader(raw_samples / "wiki" / name)
    docs = list(reader)
    assert_accounting(records, docs, reader.counts)
    assert reader.counts.dropped == dropped and reader.counts.errors == {}
    assert len({d.id for d in docs}) == kept
    assert all(d.source == "wikipedia" and d.meta["title"] and d.meta["timestamp"] for d in docs)


def test_ids_and_urls_come_from_siteinfo(raw_samples):
    docs = list(WikipediaReader(raw_samples / "wiki" / "zhwiki-test-pages.xml"))
    assert docs[0].id == "zhwiki/13"
    assert docs[0].meta["url"] == "https://zh.wikipedia.org/wiki/%E6%95%B0%E5%AD%A6"  # 数学
    assert docs[0].meta["language"] == "zh"


def test_dump_without_siteinfo_uses_file_stem(raw_samples):
    path = raw_samples / "wiki" / "enwiki-table-markup.xml.bz2"
    assert read_siteinfo(path) == {"lang": "en"}
    docs = list(WikipediaReader(path))
    assert all(d.id.startswith("enwiki-table-markup/") and "url" not in d.meta for d in docs)


def test_redirect_text_and_tag_are_both_dropped(tmp_path):
    pages = [
        *ARTICLES[:2],
        ("R1", 0, 7, "#REDIRECT [[Article 1]]"),
        ("R2", 0, 8, "  #redirect[[x]]"),
        ("Talk", 1, 9, "talk page"),
    ]
    xml = make_dump(pages).replace("<title>R1</title>", '<title>R1</title><redirect title="Article 1" />')
    (tmp_path / "t.xml").write_text(xml)
    reader = WikipediaReader(tmp_path / "t.xml")
    docs = list(reader)
    assert [d.id for d in docs] == ["testwiki/1", "testwiki/2"]
    assert reader.counts.dropped == {"redirect": 2, "not_main_namespace": 1}
    assert docs[0].meta == {
        "title": "Article 1",
        "url": "https://test.invalid/wiki/Article_1",
        "timestamp": "2020-01-02T00:00:00Z",
        "language": "en",
    }


def test_disambiguation_pages_are_dropped_unless_asked_to_keep(tmp_path):
    pages = [
        *ARTICLES[:2],
        ("Mercury", 0, 7, "Mercury may refer to:\n* [[Mercury (planet)]]\n{{Disambiguation|astro}}"),
        ("Aa", 0, 8, "Aa rivers:\n{{geodis}}"),
        ("Ok", 0, 9, "Uses {{Infobox river}} and {{disambiguation needed}} inline. " * 3),
    ]
    (tmp_path / "d.xml").write_text(make_dump(pages))
    reader = WikipediaReader(tmp_path / "d.xml")
    assert [d.meta["title"] for d in reader] == ["Article 1", "Article 2", "Ok"]
    assert reader.counts.dropped == {"disambiguation": 2}
    assert len(list(WikipediaReader(tmp_path / "d.xml", skip_disambiguation=False))) == 5


def test_truncated_bz2_keeps_pages_before_the_cut(raw_samples, tmp_path, caplog):
    src = raw_samples / "wiki" / "ltgwiki-pages-articles.xml.bz2"
    full = [d.id for d in WikipediaReader(src)]
    cut = tmp_path / "ltgwiki-cut.xml.bz2"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    reader = WikipediaReader(cut)
    with caplog.at_level(logging.WARNING):
        ids = [d.id for d in reader]
    assert 0 < len(ids) < len(full) and ids == full[: len(ids)]
    assert reader.counts.errors == {"truncated_input": 1}
    assert str(cut) in caplog.text and "compressed byte" in caplog.text


def test_malformed_xml_skips_only_the_broken_page(tmp_path, caplog):
    xml = make_dump(ARTICLES).replace("<title>Article 4</title>", "<title>Article 4</titel>")
    path = tmp_path / "bad.xml"
    path.write_text(xml)
    reader = WikipediaReader(path)
    with caplog.at_level(logging.WARNING):
        docs = list(reader)
    assert [d.meta["title"] for d in docs] == ["Article 1", "Article 2", "Article 3", "Article 5"]
    assert reader.counts.errors == {"malformed_xml": 1}
    assert_accounting(5, docs, reader.counts)  # 4 pages + the broken one
    assert "bad.xml" in caplog.text and "page at byte" in caplog.text and "line" in caplog.text


@pytest.mark.parametrize(
    ("content", "suffix", "reason"),
    [
        (b"id,text\n1,hello\n", ".xml", "not_xml"),
        (b"<html><body>not a dump</body></html>", ".xml", "not_mediawiki"),
        (b"this is not bzip2 data at all", ".xml.bz2", "corrupt_input"),
        (b"nor gzip", ".xml.gz", "corrupt_input"),
    ],
)
def test_foreign_files_are_one_counted_error(tmp_path, caplog, content, suffix, reason):
    path = tmp_path / f"foreign{suffix}"
    path.write_bytes(content)
    reader = WikipediaReader(path)
    with caplog.at_level(logging.WARNING):
        assert list(reader) == []
    assert reader.counts.errors == {reason: 1} and reader.counts.kept == 0
    assert path.name in caplog.text


@pytest.mark.parametrize(
    ("content", "suffix"), [(b"", ".xml"), (b"", ".xml.bz2"), (bz2.compress(b""), ".xml.bz2")]
)
def test_empty_input_gives_no_documents_and_no_error(tmp_path, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(content)
    reader = WikipediaReader(path)
    assert list(reader) == []
    assert reader.counts.total_in == 0


def test_gzip_dump(tmp_path):
    import gzip

    (tmp_path / "g.xml.gz").write_bytes(gzip.compress(make_dump(ARTICLES).encode()))
    assert len(list(WikipediaReader(tmp_path / "g.xml.gz"))) == len(ARTICLES)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nope.xml.bz2"):
        WikipediaReader(tmp_path / "nope.xml.bz2")


def test_memory_holds_one_page_at_a_time(tmp_path, monkeypatch):
    """Each page is parsed on its own: the parser never sees more than one page's bytes."""
    import xml.etree.ElementTree as ET

    path = tmp_path / "many.xml.bz2"
    path.write_bytes(bz2.compress(make_dump([(f"A{i}", 0, i, "x " * 50) for i in range(1, 3001)]).encode()))
    sizes = []
    real = ET.fromstring
    monkeypatch.setattr(ET, "fromstring", lambda text: sizes.append(len(text)) or real(text))
    assert sum(1 for _ in WikipediaReader(path)) == 3000
    assert len(sizes) == 3000 and max(sizes) < 400


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("enwiki-20240101-pages-articles1.xml-p1p41242.bz2", "enwiki-20240101-pages-articles1.xml-p1p41242"),
        ("ltgwiki-pages-articles.xml.bz2", "ltgwiki-pages-articles"),
        ("zhwiki-test-pages.xml", "zhwiki-test-pages"),
        ("c4.en.jsonl.zst", "c4.en"),
    ],
)
def test_input_stem(name, stem):
    assert input_stem(f"/data/{name}") == stem


def test_page_url():
    assert (
        page_url("https://en.wikipedia.org/wiki/Main_Page", "AC/DC (band)")
        == "https://en.wikipedia.org/wiki/AC/DC_(band)"
    )
    assert page_url("https://example.org", "X") is None
    assert page_url(None, "X") is None


def test_multistream_ranges_read_every_page_once(tmp_path):
    from data_helpers import make_multistream

    from pipeline.data.multistream import index_path, stream_ranges

    pages = [(f"Page {i}", 0 if i % 7 else 1, i, f"Text of page {i}. " * 10) for i in range(1, 96)]
    dump = make_multistream(tmp_path, pages, per_stream=10)
    assert index_path(dump).name == "testwiki-pages-articles-multistream-index.txt.bz2"
    whole = WikipediaReader(dump)
    expected = [d.id for d in whole]
    ranges = stream_ranges(dump, streams_per_task=3)
    assert len(ranges) == 4 and ranges[0][0] > 0 and ranges[-1][1] < dump.stat().st_size  # no header/footer
    ids, counts = [], []
    for r in ranges:
        reader = WikipediaReader(dump, byte_range=r)
        ids += [d.id for d in reader]
        counts.append(reader.counts)
    assert ids == expected and len(ids) == 95 - 13
    assert sum(c.total_in for c in counts) == whole.counts.total_in == 95
    assert all(c.errors == {} for c in counts)
