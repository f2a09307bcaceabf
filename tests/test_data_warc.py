"""The WARC reader on WARCs as crawlers write them (pipeline/data/{warc,warc_frame}.py and the report's
WARC section): chunked and compressed bodies, legacy charsets, three file layouts, damaged framing,
on both back ends. Every file here is written by the test (warcio's WARCWriter, or by hand)."""

from __future__ import annotations

import gzip
import io
import random
import zlib

import brotli
import pytest
from helpers import assert_accounting
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.data import warc
from pipeline.data.config import CleanConfig, DataConfig
from pipeline.data.report import render_markdown, web_rows
from pipeline.data.shards import clean_file
from pipeline.data.warc import HtmlExtractor, WarcReader

DE_ZH = "Grüße aus Zürich — 你好，世界。Straßenbahn fährt über die Brücke. "
RU = "Привет, мир… Это страница — на русском языке, и «кавычки» тоже. "
FR = "Les élèves français étudient à l'école où l'été dure ; ça déçoit ! "
ZH = "这是一个中文网页，镕堃喆旻犇都是只有GBK才有的字符，它们不在GB2312里。"


def html(text: str, meta: str = "") -> str:
    paragraphs = "".join(f"<p>{text} ({i})</p>" for i in range(4))
    return f"<html><head>{meta}<title>t</title></head><body><article>{paragraphs}</article></body></html>"


def chunked(data: bytes, size: int = 100) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)
    )
    return out + b"0\r\n\r\n"


HTML_UTF8 = [("Content-Type", "text/html; charset=utf-8")]
# name -> (HTTP headers, body as stored, text that must come out)
PAGES = {
    "plain": (HTML_UTF8, html(DE_ZH).encode(), DE_ZH),
    "chunked": (HTML_UTF8 + [("Transfer-Encoding", "chunked")], chunked(html(DE_ZH).encode()), DE_ZH),
    # the Internet Archive's writer: de-chunked body, header kept
    "dechunked": (HTML_UTF8 + [("Transfer-Encoding", "chunked")], html(DE_ZH).encode(), DE_ZH),
    "gzip": (HTML_UTF8 + [("Content-Encoding", "gzip")], gzip.compress(html(DE_ZH).encode()), DE_ZH),
    "deflate": (HTML_UTF8 + [("Content-Encoding", "deflate")], zlib.compress(html(DE_ZH).encode()), DE_ZH),
    "br": (HTML_UTF8 + [("Content-Encoding", "br")], brotli.compress(html(DE_ZH).encode()), DE_ZH),
    "chunked_gzip": (
        HTML_UTF8 + [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
        chunked(gzip.compress(html(DE_ZH).encode()), 64),
        DE_ZH,
    ),
    "gzip_then_br": (
        HTML_UTF8 + [("Content-Encoding", "gzip, br")],
        brotli.compress(gzip.compress(html(DE_ZH).encode())),
        DE_ZH,
    ),
    # a browser-based recorder: the body the browser decoded, under the headers it received
    "recorded": (
        HTML_UTF8 + [("Content-Encoding", "br"), ("Transfer-Encoding", "chunked")],
        html(DE_ZH).encode(),
        DE_ZH,
    ),
    "gbk_as_gb2312": ([("Content-Type", "text/html; charset=gb2312")], html(ZH).encode("gb18030"), ZH),
    "cp1251_in_meta": (
        [("Content-Type", "text/html")],
        html(RU, '<meta http-equiv="Content-Type" content="text/html; charset=windows-1251">').encode(
            "cp1251"
        ),
        RU,
    ),
    "cp1251_as_latin1": ([("Content-Type", "text/html; charset=ISO-8859-1")], html(RU).encode("cp1251"), RU),
    "cp1252_as_utf8": ([("Content-Type", "text/html; charset=UTF-8")], html(FR).encode("cp1252"), FR),
    "no_content_type": ([], b"\n<!DOCTYPE html>" + html(DE_ZH).encode(), DE_ZH),
}
DROPPED = {  # name -> (status, HTTP headers, body, reason)
    "not_found": ("404 Not Found", HTML_UTF8, html("gone").encode(), "http_status"),
    "image": (
        "200 OK",
        [("Content-Type", "image/png")],
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        "http_content_type",
    ),
}
BAD_GZIP = ("200 OK", HTML_UTF8 + [("Content-Encoding", "gzip")], b"\x1f\x8b\x08\x00" + bytes(range(1, 99)))


def write_crawl(path, compress: bool = True) -> int:
    """Every case above as a WARC written by warcio (one gzip member per record); returns records written."""
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=compress)
        records = [(f"https://x.test/{n}", "200 OK", h, b) for n, (h, b, _) in PAGES.items()]
        records += [(f"https://x.test/{n}", s, h, b) for n, (s, h, b, _) in DROPPED.items()]
        records.append(("<https://x.test/bad_gzip>", *BAD_GZIP))  # wget's <...> around the URI
        for uri, status, headers, body in records:
            http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=http))
            w.write_record(
                w.create_warc_record(uri, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n"))
            )
        dns = w.create_warc_record(
            "dns:x.test", "response", payload=io.BytesIO(b"x.test. 300 IN A 10.0.0.1\n")
        )
        dns.rec_headers.replace_header("Content-Type", "text/dns")
        w.write_record(dns)
    return 2 * len(records) + 1


@pytest.fixture(params=["fastwarc", "warcio"])
def backend(request, monkeypatch):
    monkeypatch.setattr(warc, "backend", lambda: request.param)
    return request.param


def test_every_body_and_charset_case_comes_out(tmp_path, backend):
    path = tmp_path / "crawl.warc.gz"
    n = write_crawl(path)
    reader = WarcReader(path)
    docs = list(reader)
    assert_accounting(n, docs, reader.counts)
    assert reader.counts.dropped == {
        "warc_request": (n - 1) // 2,
        "http_status": 1,
        "http_content_type": 1,
        "warc_not_http": 1,
    }
    assert reader.counts.errors == {"http_bad_gzip": 1}
    out, counts = HtmlExtractor().process(docs)
    assert_accounting(docs, out, counts)
    by_url = {d.meta["url"]: d for d in out}
    assert sorted(by_url) == sorted(f"https://x.test/{name}" for name in PAGES)
    for name, (_, _, text) in PAGES.items():
        doc = by_url[f"https://x.test/{name}"]
        assert text.strip() in doc.text, name
        assert "\ufffd" not in doc.text and doc.meta["replacements"] == 0, name
    assert by_url["https://x.test/gbk_as_gb2312"].meta["charset"] == "gb18030"
    assert by_url["https://x.test/cp1251_in_meta"].meta["charset_source"] == "meta"


def test_bad_body_is_counted_with_file_offset_and_url(tmp_path, caplog):
    path = tmp_path / "crawl.warc.gz"
    write_crawl(path)
    list(WarcReader(path))
    assert "crawl.warc.gz: http_bad_gzip at byte" in caplog.text
    assert "https://x.test/bad_gzip:" in caplog.text  # the <...> unwrapped


@pytest.mark.parametrize("layout", ["plain", "whole_file_gzip"])
def test_other_layouts_read_the_same_documents(tmp_path, backend, layout):
    members = tmp_path / "crawl.warc.gz"
    write_crawl(members)
    if layout == "plain":
        path = tmp_path / "crawl.warc"
        write_crawl(path, compress=False)
    else:  # someone ran `gzip` on a .warc: warcio alone refuses it, FastWARC alone repeats ids
        path = tmp_path / "whole.warc.gz"
        path.write_bytes(gzip.compress(gzip.decompress(members.read_bytes())))
    want = [(d.meta["url"], d.text) for d in WarcReader(members)]
    reader = WarcReader(path)
    docs = list(reader)
    assert [(d.meta["url"], d.text) for d in docs] == want
    assert len({d.id for d in docs}) == len(docs) and reader.counts.errors == {"http_bad_gzip": 1}


# --- damaged framing: six pages, one record damaged, in three layouts -----------------------------


def record(uri: str, block: bytes, length: int | None = None, first_line: bytes = b"WARC/1.0") -> bytes:
    head = (
        first_line + b"\r\nWARC-Type: response\r\nWARC-Target-URI: " + uri.encode() + b"\r\n"
        b"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000000>\r\n"
        b"Content-Type: application/http; msgtype=response\r\n"
    )
    if length != -1:
        head += b"Content-Length: %d\r\n" % (len(block) if length is None else length)
    return head + b"\r\n" + block + b"\r\n\r\n"


def page_block(i: int) -> bytes:
    noise = random.Random(i).randbytes(150).hex()  # incompressible: a cut 100 bytes from the end of a
    body = html(f"Page {i} says hello. " * 5 + noise).encode()  # gzip stream hits the last record only
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + body


def damaged(case: str) -> tuple[list[bytes], list[int], dict[str, int]]:
    """(record bytes, pages that must come out, errors) for one kind of damage to page 2."""
    blocks = [page_block(i) for i in range(6)]
    recs = [record(f"https://x.test/{i}", b) for i, b in enumerate(blocks)]
    good = [0, 1, 3, 4, 5]
    if case == "length_too_long":
        recs[2] = record("https://x.test/2", blocks[2], len(blocks[2]) + 150)
    elif case == "length_swallows_two_records":
        recs[2] = record("https://x.test/2", blocks[2], len(blocks[2]) + len(recs[3]) + len(recs[4]) + 99)
    elif case == "length_too_short":
        recs[2] = record("https://x.test/2", blocks[2], len(blocks[2]) - 150)
    elif case == "garbage_header":
        recs[2] = record("https://x.test/2", blocks[2], first_line=b"WARC/garbage\r\nnot a header line")
    elif case == "no_content_length":
        recs[2] = record("https://x.test/2", blocks[2], length=-1)
    elif case == "junk_between_records":
        recs.insert(3, b"\x00\x01 junk that is no record \xff\r\n\r\n")
        good = list(range(6))
    return recs, good, {"bad_warc_length" if case.startswith("length") else "bad_warc_record": 1}


DAMAGE = [
    "length_too_long",
    "length_swallows_two_records",
    "length_too_short",
    "garbage_header",
    "no_content_length",
    "junk_between_records",
    "truncated",
]
LAYOUTS = {
    "plain": b"".join,
    "member_per_record": lambda recs: b"".join(gzip.compress(r) for r in recs),
    "whole_file_gzip": lambda recs: gzip.compress(b"".join(recs)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_record_is_dropped_and_its_neighbours_kept(tmp_path, backend, case, layout, caplog):
    recs, good, errors = damaged(case)
    data = LAYOUTS[layout](recs)
    if case == "truncated":
        data, good, errors = data[:-100], [0, 1, 2, 3, 4], {"truncated_record": 1}
    path = tmp_path / ("x.warc" if layout == "plain" else "x.warc.gz")
    path.write_bytes(data)
    reader = WarcReader(path)
    docs = list(reader)
    assert reader.counts.errors == errors
    assert [d.meta["url"] for d in docs] == [f"https://x.test/{i}" for i in good]
    for d in docs:  # no record swallowed another one's header or text
        assert "WARC/1.0" not in d.text and d.text.count("says hello") == 20, d.meta["url"]
    assert_accounting(len(good) + 1, docs, reader.counts)
    assert f"{path}: {next(iter(errors))} at " in caplog.text


def test_damaged_gzip_member_loses_only_its_record(tmp_path, backend):
    recs, good, _ = damaged("none")
    members = [gzip.compress(r) for r in recs]
    members[2] = members[2][:40] + bytes(b ^ 0x5A for b in members[2][40:60]) + members[2][60:]
    path = tmp_path / "x.warc.gz"
    path.write_bytes(b"".join(members))
    reader = WarcReader(path)
    docs = list(reader)
    assert [d.meta["url"] for d in docs] == [f"https://x.test/{i}" for i in good]
    assert reader.counts.errors == {"bad_warc_record": 1}
    assert_accounting(6, docs, reader.counts)


def test_report_shows_where_each_warc_files_responses_went(tmp_path):
    src = tmp_path / "crawl.warc.gz"
    n = write_crawl(src)
    cfg = DataConfig(inputs=[str(src)], output_dir=tmp_path, steps=["clean"], clean=CleanConfig(min_chars=0))
    cfg.max_error_fraction = 0.5  # one bad body in 35 records
    stats = clean_file(src, tmp_path / "cleaned", cfg, "h")
    [row] = web_rows({"shards": {"crawl": stats}})
    n_pages = len(PAGES)
    assert row == {
        "file": "crawl",
        "records": n,
        "responses": n_pages + 3,  # pages, 404, image, bad gzip (the dns: record is no HTTP response)
        "status": 1,
        "content_type": 1,
        "html": n_pages + 1,
        "body_errors": 1,
        "no_main_content": 0,
        "extracted": n_pages,
    }
    from pipeline.data.steps import summarize_clean

    md = render_markdown({"name": "t", "steps": ["clean"], "clean": summarize_clean({"crawl": stats})})
    assert "## WARC inputs" in md and f"| crawl | {n} | {n_pages + 3} | 1 | 1 | {n_pages + 1} | 1 | 0 |" in md
