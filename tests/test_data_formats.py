"""Web and record readers on the real samples (pipeline/data/{formats,jsonl,warc}.py)."""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_accounting

from pipeline.data.config import ReadConfig
from pipeline.data.formats import detect_format, extraction_stages, open_reader
from pipeline.data.stage import run_stages
from pipeline.data.warc import WarcReader
from pipeline.errors import DataError

WEB = {  # file (under web/) -> (format, records, kept); counts from SOURCES.md
    "CC-MAIN-20190717121559-20190717143559-00140.dolma.jsonl.gz": ("jsonl", 697, 697),
    "c4-en-sample.jsonl": ("jsonl", 300, 300),
    "c4-shards/c4-sample.02.json.gz": ("jsonl", 10, 10),
    "ccnet-cc_en_head-0091.jsonl.gz": ("jsonl", 10, 10),
    "oscar-2201-multilingual-sample.jsonl.zst": ("jsonl", 63, 63),  # text in `content`
    "redpajama-cc-2023-06-sample.jsonl": ("jsonl", 10, 10),
    # WARC: every record is counted; only the HTML responses become documents
    "CC-MAIN-20200808165417-20200808195417-00395.excerpt.warc.gz": ("warc", 50, 16),
    "CC-MAIN-2024-22-whirlwind.warc.gz": ("warc", 4, 1),
    "wget-sample-0001.warc.gz": ("warc", 34, 15),
    "CC-MAIN-2024-22-whirlwind.warc.wet.gz": ("wet", 2, 1),
    "CC-MAIN-2024-22-whirlwind.warc.wat.gz": ("warc", 2, 0),
}


@pytest.mark.parametrize("name", sorted(WEB))
def test_every_web_sample_reads(raw_samples, name):
    fmt, records, kept = WEB[name]
    path = raw_samples / "web" / name
    assert detect_format(path) == fmt
    reader = open_reader(path, fmt, ReadConfig())
    docs = list(reader)
    assert_accounting(records, docs, reader.counts)
    assert reader.counts.errors == {} and len({d.id for d in docs}) == kept
    assert all(isinstance(d.text, str) and d.source for d in docs)


def test_oscar_text_comes_from_content_and_ids_from_position(raw_samples):
    docs = list(
        open_reader(raw_samples / "web" / "oscar-2201-multilingual-sample.jsonl.zst", "jsonl", ReadConfig())
    )
    assert docs[0].id == "oscar-2201-multilingual-sample/1" and len(docs[0].text) > 1000
    assert docs[0].meta["url"].startswith("http")  # from warc_headers.warc-target-uri
    only_text = list(
        open_reader(raw_samples / "web" / "c4-en-sample.jsonl", "jsonl", ReadConfig(text_fields=["content"]))
    )
    assert only_text == []


def test_warc_html_to_main_content(raw_samples):
    path = raw_samples / "web" / "wget-sample-0001.warc.gz"
    reader = WarcReader(path)
    docs = list(reader)
    assert reader.counts.dropped == {
        "warc_warcinfo": 1,
        "warc_request": 15,
        "warc_metadata": 1,
        "warc_resource": 2,
    }
    assert docs[0].meta["url"] == "https://creativecommons.org/"  # wget's <...> brackets stripped
    assert docs[0].id == f"{path.name}#{856}"
    stages = extraction_stages("warc", {}, ReadConfig())
    out, counts = run_stages(stages, docs)
    assert_accounting(docs, out, counts)
    assert not any(re.search(r"<(html|head|div|script|p)[ >]", d.text) for d in out)  # tags gone
    assert not any(d.text.startswith("7d72") for d in out)  # chunked transfer encoding was decoded


def test_wet_keeps_its_language_header(raw_samples):
    [doc] = list(WarcReader(raw_samples / "web" / "CC-MAIN-2024-22-whirlwind.warc.wet.gz", wet=True))
    assert doc.meta["language"] == "spa" and doc.meta["url"] == "https://an.wikipedia.org/wiki/Escopete"
    assert "Escopete" in doc.text


def test_trafilatura_option(raw_samples):
    docs = list(WarcReader(raw_samples / "web" / "CC-MAIN-2024-22-whirlwind.warc.gz"))
    [stage] = extraction_stages("warc", {}, ReadConfig(html_extractor="trafilatura"))
    out, counts = stage.process(docs)
    assert_accounting(docs, out, counts)
    assert out and "Escopete" in out[0].text


def test_parquet_and_saved_dataset(raw_samples, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (raw_samples / "web" / "redpajama-cc-2023-06-sample.jsonl").open()]
    rows.append({"text": None})  # a row without text is a counted error
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rp.parquet", row_group_size=4)
    reader = open_reader(tmp_path / "rp.parquet", detect_format(tmp_path / "rp.parquet"), ReadConfig())
    docs = list(reader)
    assert_accounting(11, docs, reader.counts)
    assert reader.counts.errors == {"missing_text": 1} and docs[3].text == rows[3]["text"]

    import datasets  # a runtime dependency: its absence must fail, not skip

    datasets.Dataset.from_list(rows[:10]).save_to_disk(str(tmp_path / "rp_ds"))
    assert detect_format(tmp_path / "rp_ds") == "hf_disk"
    saved = list(open_reader(tmp_path / "rp_ds", "hf_disk", ReadConfig()))
    assert [d.text for d in saved] == [d.text for d in docs]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("x.xml.bz2", "wikipedia"),
        ("x.jsonl.zst", "jsonl"),
        ("c4.json.gz", "jsonl"),
        ("a.warc", "warc"),
        ("CC.warc.wet.gz", "wet"),
        ("t.parquet", "parquet"),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


def test_unknown_suffix_is_a_data_error_with_the_fix():
    with pytest.raises(DataError, match=r"notes\.txt: cannot tell the format .* set format"):
        detect_format("notes.txt")


@pytest.mark.parametrize("name", [n for n in sorted(WEB) if WEB[n][0] in ("warc", "wet")])
def test_warcio_fallback_reads_the_same_documents(raw_samples, monkeypatch, name):
    from pipeline.data import warc

    fmt, _, kept = WEB[name]
    fast = list(WarcReader(raw_samples / "web" / name, wet=fmt == "wet"))
    monkeypatch.setattr(warc, "backend", lambda: "warcio")
    reader = WarcReader(raw_samples / "web" / name, wet=fmt == "wet")
    slow = list(reader)
    assert reader._records is warc._warcio_records and reader.counts.errors == {}
    assert [(d.id, d.meta["url"]) for d in slow] == [(d.id, d.meta["url"]) for d in fast] and len(
        slow
    ) == kept
    assert [d.text for d in slow] == [d.text for d in fast]


def test_a_new_format_is_one_registry_entry(tmp_path, monkeypatch):
    """Detection by suffix, config validation and the reader all come from `FORMATS` alone."""
    from pipeline.data import formats
    from pipeline.data.config import DataConfig
    from pipeline.data.document import Counts, Document
    from pipeline.errors import ConfigError

    class LinesReader:
        def __init__(self, path):
            self.path, self.site, self.counts = path, {}, Counts()

        def __iter__(self):
            for i, line in enumerate(self.path.read_text().splitlines()):
                self.counts.kept += 1
                yield Document(id=f"{self.path.stem}/{i}", text=line, source="lines")

    monkeypatch.setitem(
        formats.FORMATS, "lines", formats.Format("lines", (".lines",), lambda p, r, b: LinesReader(p))
    )
    (tmp_path / "a.lines").write_text("one\ntwo\n")
    assert detect_format(tmp_path / "a.lines") == "lines"
    DataConfig(inputs=["a.lines"], output_dir=tmp_path, format="lines", steps=["clean"]).validate()
    assert [d.text for d in open_reader(tmp_path / "a.lines", "lines", ReadConfig())] == ["one", "two"]
    assert extraction_stages("lines", {}, ReadConfig()) == []
    with pytest.raises(ConfigError, match=r"format: must be auto or one of wikipedia, .*lines, got 'csv'"):
        DataConfig(inputs=["a"], output_dir=tmp_path, format="csv").validate()
    with pytest.raises(DataError, match="format jsonl cannot read a byte range"):
        open_reader(tmp_path / "a.jsonl", "jsonl", ReadConfig(), (0, 10))
