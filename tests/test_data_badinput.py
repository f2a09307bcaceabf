"""Bad input (DESIGN invariant 5): every kind of damage is counted with file and offset, never fatal,
and the good records around it are kept; a shard over its error limit fails loudly."""

from __future__ import annotations

import logging

import pytest
from data_helpers import build_bad_corpus, good_line
from helpers import assert_accounting

from pipeline.data.config import CleanConfig, DataConfig
from pipeline.data.formats import detect_format, open_reader
from pipeline.data.shards import clean_file
from pipeline.errors import DataError
from pipeline.io import read_jsonl_zst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, build_bad_corpus(folder)


def read_all(path):
    reader = open_reader(path, detect_format(path), DataConfig(inputs=["x"], output_dir=path).read)
    return reader, list(reader)


def test_every_file_reads_with_its_damage_counted(corpus, caplog):
    folder, expected = corpus
    for name, want in sorted(expected.items()):
        with caplog.at_level(logging.WARNING):
            reader, docs = read_all(folder / name)
        counts = reader.counts
        assert counts.errors == want.errors, name
        assert counts.dropped == want.dropped, name
        assert counts.noted == want.noted, name
        n_in = want.records if want.records >= 0 else counts.total_in
        assert_accounting(n_in, docs, counts)
        assert _in_order(want.good, [d.text for d in docs]), name
        if want.errors:
            assert name in caplog.text, f"{name}: the warning does not name the file"
        caplog.clear()


def test_truncated_streams_keep_the_records_before_the_cut(corpus):
    folder, _ = corpus
    for name in ("truncated.jsonl.gz", "truncated.jsonl.zst", "truncated.jsonl.bz2", "truncated.xml.bz2"):
        reader, docs = read_all(folder / name)
        assert len(docs) > 0 and reader.counts.errors == {"truncated_input": 1}, name
        if name.endswith(".jsonl.gz"):
            assert docs[-1].id == f"truncated/g{len(docs) - 1}"  # an unbroken prefix, in order


@pytest.mark.parametrize("name", ["corrupt_member.jsonl.gz", "corrupt_member.jsonl.bz2"])
def test_corrupt_middle_member_keeps_the_members_around_it(corpus, caplog, name):
    folder, _ = corpus
    with caplog.at_level(logging.WARNING):
        reader, docs = read_all(folder / name)
    ids = [d.id for d in docs]
    assert ids[:20] == [f"corrupt_member/g{i}" for i in range(20)]
    assert ids[-20:] == [f"corrupt_member/g{i}" for i in range(40, 60)]
    assert all(d.text == good_line(int(d.id.rsplit("g", 1)[1]))["text"] for d in docs)  # nothing spliced
    assert reader.counts.errors == {"corrupt_input": 1} and "compressed byte" in caplog.text


def test_truncated_xml_gz_keeps_every_complete_page(corpus):
    import zlib

    folder, _ = corpus
    data = (folder / "truncated_pages.xml.gz").read_bytes()
    decodable = zlib.decompressobj(wbits=31).decompress(data)
    reader, docs = read_all(folder / "truncated_pages.xml.gz")
    assert len(docs) == decodable.count(b"</page>") > 100
    assert reader.counts.errors == {"truncated_input": 1}


def test_repaired_records_are_written_and_counted(corpus, tmp_path):
    folder, _ = corpus
    cfg = DataConfig(inputs=["x"], output_dir=tmp_path, steps=["clean"], clean=CleanConfig(min_chars=10))
    stats = clean_file(folder / "lone_surrogate.jsonl", tmp_path / "cleaned", cfg, "h")
    assert stats["totals"]["kept"] == 3 and stats["totals"]["noted"] == {"lone_surrogate": 1}
    rows = list(read_jsonl_zst(tmp_path / "cleaned" / "lone_surrogate.jsonl.zst"))
    assert "half a pair \ufffd here" in rows[1]["text"]


def test_warc_damage_keeps_the_records_around_it(corpus, caplog):
    folder, _ = corpus
    with caplog.at_level(logging.WARNING):
        _, docs = read_all(folder / "broken_header.warc.gz")
    assert ["Page 2" in d.text for d in docs] == [False] * 5
    assert "bad_warc_record at byte" in caplog.text


def test_error_fraction_limit_fails_the_shard_loudly(corpus, tmp_path):
    folder, _ = corpus
    src = folder / "not_object.jsonl"
    cfg = DataConfig(inputs=[str(src)], output_dir=tmp_path, steps=["clean"], clean=CleanConfig(min_chars=10))
    cfg.max_error_fraction = 0.5
    with pytest.raises(DataError, match=r"not_object\.jsonl: 5 of 7 records could not be read"):
        clean_file(src, tmp_path / "cleaned", cfg, "h")
    assert not list((tmp_path / "cleaned").glob("*.jsonl.zst"))
    cfg.max_error_fraction = 0.8
    stats = clean_file(src, tmp_path / "cleaned", cfg, "h")
    assert stats["totals"]["kept"] == 2 and stats["totals"]["in"] == 7


def _in_order(wanted: list[str], texts: list[str]) -> bool:
    """Each wanted string is found in a different text, in order, and nothing else came out."""
    if not wanted:
        return True
    return len(texts) == len(wanted) and all(w in t for w, t in zip(wanted, texts))


@pytest.mark.parametrize("name", ["broken_header.warc.gz", "truncated.warc.gz"])
def test_warc_damage_with_the_warcio_fallback(corpus, monkeypatch, name):
    from pipeline.data import warc

    folder, expected = corpus
    monkeypatch.setattr(warc, "backend", lambda: "warcio")
    reader, docs = read_all(folder / name)
    want = expected[name]
    assert reader.counts.errors == want.errors and reader.counts.dropped == want.dropped
    assert_accounting(want.records, docs, reader.counts)
    assert _in_order(want.good, [d.text for d in docs])
