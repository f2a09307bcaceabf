"""HTTP bodies and charsets as crawlers store them (pipeline/data/{http,charset}.py): pure functions on bytes."""

from __future__ import annotations

import gzip
import random
import zlib

import brotli
import pytest
import zstandard

from pipeline.data.charset import decode, decode_html, encoding_for_label, meta_charset
from pipeline.data.http import HttpError, HttpResponse, dechunk, decode_body, parse_response

HTML = "<html><body><p>Grüße aus Zürich — 你好，世界</p></body></html>".encode()


def chunked(data: bytes, size: int = 7) -> bytes:
    parts = [
        b"%x;ext=1\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\nX-Trailer: 1\r\n\r\n"


def response(body: bytes, **headers: str) -> HttpResponse:
    return HttpResponse(200, {k.replace("_", "-"): [v] for k, v in headers.items()}, body)


def test_parse_response_headers_folding_repeats_and_non_http():
    block = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html;\r\n charset=gbk\r\nContent-Encoding: gzip\r\n"
        b"content-encoding: br\r\nX-Name: \xc3\x85ngstr\xc3\xb6m\r\n\r\nBODY"
    )
    resp = parse_response(block)
    assert resp.status == 200 and resp.body == b"BODY"
    assert resp.content_type() == ("text/html", "gbk")  # folded onto the previous line
    assert resp.tokens("content-encoding") == ["gzip", "br"]  # repeated header keeps both, in order
    assert len(resp.headers) == 3  # the 0x85 byte inside "Å" did not split a line
    assert parse_response(b"HTTP/1.0 404 Not Found\n\nnope").status == 404  # LF-only
    assert parse_response(b"example.com. 300 IN A 93.184.216.34\r\n") is None  # a dns: record
    with pytest.raises(HttpError, match="status line") as err:
        parse_response(b"HTTP/1.1 OK\r\n\r\n")
    assert err.value.reason == "http_bad_header"


def test_dechunk_checks_the_framing_against_the_bytes():
    assert dechunk(chunked(HTML)) == (HTML, True)
    assert dechunk(HTML) == (HTML, True)  # stored de-chunked under a chunked header: as is
    text = b"be\r\n" + b"a text whose first line happens to be hex. " * 8
    assert dechunk(text) == (text, True)  # no CRLF after 0xbe bytes: not chunked
    cut = chunked(HTML)[:40]
    data, complete = dechunk(cut)
    assert not complete and HTML.startswith(data) and len(data) >= 14  # the crawler's cut: the prefix


@pytest.mark.parametrize(
    ("headers", "encode"),
    [
        ({"content_encoding": "gzip"}, gzip.compress),
        (
            {"content_encoding": "x-gzip"},
            lambda d: gzip.compress(d[:50]) + gzip.compress(d[50:]),
        ),  # 2 members
        ({"content_encoding": "deflate"}, zlib.compress),
        ({"content_encoding": "deflate"}, lambda d: zlib.compress(d, wbits=-15)),  # raw deflate
        ({"content_encoding": "br"}, brotli.compress),
        ({"content_encoding": "zstd"}, lambda d: zstandard.ZstdCompressor().compress(d)),
        ({"content_encoding": "gzip, br"}, lambda d: brotli.compress(gzip.compress(d))),  # stacked
        ({"content_encoding": "br", "transfer_encoding": "chunked"}, lambda d: chunked(brotli.compress(d))),
        ({"transfer_encoding": "gzip, chunked"}, lambda d: chunked(gzip.compress(d))),
        ({"content_encoding": "br", "transfer_encoding": "chunked"}, lambda d: d),  # a browser recorder's
        ({"content_encoding": "identity"}, lambda d: d),
    ],
)
def test_decode_body_undoes_every_coding(headers, encode):
    assert decode_body(response(encode(HTML), **headers), limit=1 << 20) == (HTML, True)


def test_decode_body_failures_are_reasons_and_cuts_keep_the_prefix():
    big = random.Random(0).randbytes(50_000).hex().encode()  # compresses about 2:1
    data, complete = decode_body(response(gzip.compress(big)[:-300], content_encoding="gzip"), 1 << 20)
    assert not complete and big.startswith(data) and len(data) > len(big) // 2
    cases = [
        (b"\x1f\x8b\x08\x00" + bytes(range(1, 200)), "gzip", "http_bad_gzip"),
        (random.Random(1).randbytes(200), "br", "http_bad_br"),
        (bytes(range(1, 200)), "compress", "http_unknown_encoding"),
        (gzip.compress(b"\0" * 3_000_000), "gzip", "http_body_too_large"),
    ]
    for body, coding, reason in cases:
        with pytest.raises(HttpError) as err:
            decode_body(response(body, content_encoding=coding), limit=1_000_000)
        assert err.value.reason == reason


@pytest.mark.parametrize(
    ("label", "encoding"),
    [
        ("gb2312", "gbk"),
        ("GBK", "gbk"),
        ("x-gbk", "gbk"),
        ("chinese", "gbk"),
        (" ISO-8859-1 ", "windows-1252"),
        ("latin1", "windows-1252"),
        ("ascii", "windows-1252"),
        ("us-ascii", "windows-1252"),
        ("x-sjis", "shift_jis"),
        ("ks_c_5601-1987", "euc-kr"),
        ("tis-620", "windows-874"),
        ("iso-8859-9", "windows-1254"),
        ("x-mac-ukrainian", "x-mac-cyrillic"),
        ('"utf8"', "utf-8"),
        ("unicode", "utf-16le"),
        ("hz-gb-2312", None),  # the standard's "replacement" encoding: fall through to the next source
        ("utf8mb4", None),
    ],
)
def test_whatwg_labels(label, encoding):
    assert encoding_for_label(label) == encoding


def test_meta_prescan_forms():
    assert meta_charset(b'<head><meta charset="GB2312"></head>') == "gbk"
    assert meta_charset(b"<META HTTP-EQUIV=Content-Type CONTENT='text/html; charset=windows-1251'>") == (
        "windows-1251"
    )
    assert meta_charset(b'<meta charset="utf-16">') == "utf-8"  # a readable <meta> cannot be UTF-16
    assert meta_charset(b'<meta charset="bogus"><meta charset="koi8-r">') == "koi8-r"
    assert meta_charset(b"<p>charset=utf-8</p>") is None


def page(text: str, meta: str = "") -> str:
    return f"<html><head>{meta}<title>t</title></head><body><p>{text}</p></body></html>"


FR = "Les élèves français étudient à l'école où l'été dure. Ça déçoit ! " * 3
RU = "Привет, мир… Это страница — на русском языке. " * 5
ZH = "这是一个中文网页，镕堃喆旻犇都是GBK才有的字符，价格€5。" * 3
JA = "日本語のページ①です。文字コードをテストします。" * 3
KO = "한국어 페이지 똠 입니다. 인코딩을 테스트합니다." * 3


@pytest.mark.parametrize(
    ("name", "body", "http_charset", "want", "source"),
    [
        ("gbk page labelled gb2312", page(ZH).encode("gb18030"), "gb2312", ZH, "http"),
        ("gb2312 in <meta> only", page(ZH, "<meta charset=gb2312>").encode("gb18030"), None, ZH, "meta"),
        (
            "windows-1251 in <meta>",
            page(RU, '<meta charset="windows-1251">').encode("cp1251"),
            None,
            RU,
            "meta",
        ),
        ("HTTP beats <meta>", page(RU, '<meta charset="koi8-r">').encode("cp1251"), "cp1251", RU, "http"),
        (
            "unknown label, then <meta>",
            page(RU, "<meta charset=cp1251>").encode("cp1251"),
            "utf8mb4",
            RU,
            "meta",
        ),
        ("windows-1251 unlabelled", page(RU).encode("cp1251"), None, RU, "detected"),
        ("windows-1251 served as latin-1", page(RU).encode("cp1251"), "iso-8859-1", RU, "detected"),
        ("cp1252 declared utf-8", page(FR).encode("cp1252"), "utf-8", FR, "detected"),
        ("cp1252, <meta> utf-8", page(FR, "<meta charset=utf-8>").encode("cp1252"), None, FR, "detected"),
        ("utf-8 served as latin-1", page(FR).encode(), "ISO-8859-1", FR, "utf8"),
        ("shift_jis labelled x-sjis", page(JA).encode("cp932"), "x-sjis", JA, "http"),
        ("uhc labelled ks_c_5601-1987", page(KO).encode("cp949"), "ks_c_5601-1987", KO, "http"),
        ("utf-8 BOM beats the header", b"\xef\xbb\xbf" + page(RU).encode(), "windows-1252", RU, "bom"),
    ],
)
def test_decode_html_reads_pages_as_written(name, body, http_charset, want, source):
    out = decode_html(body, http_charset)
    assert want in out.text, name
    assert "\ufffd" not in out.text and out.replacements == 0 and out.source == source
    assert "\x85" not in out.text  # windows-1251's "…" is no NEL line break


def test_replacements_are_counted_not_the_pages_own():
    body = page("ok \ufffd " + ZH).encode().replace("镕".encode(), b"\xff")  # 3 invalid bytes, 1 own U+FFFD
    out = decode_html(body, "utf-8")
    assert out.codec == "utf-8" and out.replacements == 3 and out.text.count("\ufffd") == 4
    assert decode(b"\x80\x81", "gbk", "http").text.startswith("\u20ac")  # the standard's GBK 0x80
    assert decode(b"caf\xe9 \x81", "windows-1252", "http").replacements == 0  # all 256 bytes defined
