"""Builders of data-prep inputs for tests: small WARC files and the bad-input corpus.

`build_bad_corpus(folder)` writes one damaged file per kind of damage the readers must survive
and returns, per file, what a correct reader does with it: how many records went in, which
good records (by text) must come out, and which error reasons are counted.
"""

from __future__ import annotations

import bz2
import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import zstandard
from helpers import ARTICLES, make_dump


def good_line(i: int) -> dict:
    noise = random.Random(i).randbytes(40).hex()  # incompressible: a cut lands after whole zstd blocks
    return {"id": f"g{i}", "text": f"Good record number {i}, {noise}. " * 3}


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def warc_record(kind: str, uri: str, payload: bytes, http: bool = True) -> bytes:
    """One uncompressed WARC/1.0 record; `payload` is the HTTP message (or text) it carries."""
    ctype = "application/http; msgtype=response" if http else "text/plain"
    head = (
        f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {uri}\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{abs(hash((kind, uri))):032x}>\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload + b"\r\n\r\n"


def html_response(i: int) -> bytes:
    body = (
        f"<html><head><title>Page {i}</title></head><body><p>{f'Page {i} has words. ' * 20}</p></body></html>"
    )
    data = body.encode("utf-8")
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n" + (
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )


def warc_gz(records: list[bytes]) -> bytes:
    """One gzip member per record, as Common Crawl writes them."""
    return b"".join(gzip.compress(r, compresslevel=1) for r in records)


@dataclass
class Expect:
    records: int
    """Records in: documents, drops and damaged units (each counted once)."""
    good: list[str]
    """Texts that must come out (in this order)."""
    errors: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    noted: dict[str, int] = field(default_factory=dict)
    """Repairs counted (Counts.noted), e.g. a stripped BOM."""


def build_bad_corpus(folder: Path) -> dict[str, Expect]:
    """Write the bad-input corpus into `folder`; {file name: what a correct reader yields}."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Expect] = {}
    rows = [good_line(i) for i in range(3000)]
    texts = [r["text"] for r in rows]
    for name, data in (
        ("truncated.jsonl.gz", gzip.compress(jsonl_bytes(rows))),
        ("truncated.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl_bytes(rows))),
        ("truncated.jsonl.bz2", bz2.compress(jsonl_bytes(rows * 6))),
    ):
        (folder / name).write_bytes(data[: len(data) * 2 // 3])
        out[name] = Expect(-1, [], {"truncated_input": 1})  # -1: the prefix read is checked by the test
    out.update(_line_damage(folder, texts))
    out.update(_xml_damage(folder))
    out.update(_repairable(folder, texts))
    out.update(_member_damage(folder, rows))
    out.update(_page_damage(folder))
    out.update(_warc_damage(folder))
    for name in ("empty.jsonl", "empty.warc.gz", "empty.xml"):
        (folder / name).write_bytes(b"")
        out[name] = Expect(0, [])
    return out


def _line_damage(folder: Path, texts: list[str]) -> dict[str, Expect]:
    good = [json.dumps(good_line(i)).encode() for i in range(3)]
    (folder / "bad_utf8.jsonl").write_bytes(
        b"\n".join([good[0], b'{"text": "caf\xe9 \xff\xfe"}', good[1]]) + b"\n"
    )
    not_objects = [
        good[0],
        b"[1, 2, 3]",
        b'"just a string"',
        b"42",
        b"{not json",
        good[1],
        b'{"title": "no text"}',
    ]
    (folder / "not_object.jsonl").write_bytes(b"\n".join(not_objects) + b"\n")
    with gzip.open(folder / "huge_line.jsonl.gz", "wb", compresslevel=1) as fh:
        fh.write(good[0] + b"\n" + b'{"text": "' + b"x" * 100_000_000 + b'"}\n' + good[1] + b"\n")
    two = texts[:2]
    return {
        "bad_utf8.jsonl": Expect(3, two, {"bad_utf8": 1}),
        "not_object.jsonl": Expect(7, two, {"not_an_object": 3, "bad_json": 1, "missing_text": 1}),
        "huge_line.jsonl.gz": Expect(3, two, {"record_too_large": 1}),
    }


def _xml_damage(folder: Path) -> dict[str, Expect]:
    xml = make_dump(ARTICLES).replace("<title>Article 4</title>", "<title>Article 4</titel>")
    (folder / "malformed.xml").write_text(xml)
    data = bz2.compress(
        make_dump([(f"P{i}", 0, i, f"Page text {i}. " * 30) for i in range(1, 5000)]).encode()
    )
    (folder / "truncated.xml.bz2").write_bytes(data[: len(data) * 3 // 4])  # past the first 900 kB block
    return {
        "malformed.xml": Expect(5, [a[3] for a in ARTICLES if a[0] != "Article 4"], {"malformed_xml": 1}),
        "truncated.xml.bz2": Expect(-1, [], {"truncated_input": 1}),
    }


def _repairable(folder: Path, texts: list[str]) -> dict[str, Expect]:
    """Records a reader repairs and keeps: a lone surrogate (JSON escape), a UTF-8 BOM."""
    good = [json.dumps(good_line(i)).encode() for i in range(3)]
    surrogate = b'{"id": "s", "text": "half a pair \\ud800 here, ' + b"long enough " * 3 + b'"}'
    (folder / "lone_surrogate.jsonl").write_bytes(b"\n".join([good[0], surrogate, good[1]]) + b"\n")
    (folder / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(good) + b"\n")
    return {
        "lone_surrogate.jsonl": Expect(
            3, [texts[0], "half a pair \ufffd here", texts[1]], noted={"lone_surrogate": 1}
        ),
        "bom.jsonl": Expect(3, texts[:3], noted={"bom": 1}),
    }


def _member_damage(folder: Path, rows: list[dict]) -> dict[str, Expect]:
    """Multi-member gzip and multi-stream bz2 files whose middle member is corrupt."""
    out = {}
    for suffix, compress in ((".gz", lambda b: gzip.compress(b, mtime=0)), (".bz2", bz2.compress)):
        members = [compress(jsonl_bytes(rows[i * 20 : i * 20 + 20])) for i in range(3)]
        middle = bytearray(members[1])
        middle[len(middle) // 2 : len(middle) // 2 + 8] = b"\xff" * 8
        name = f"corrupt_member.jsonl{suffix}"
        (folder / name).write_bytes(members[0] + bytes(middle) + members[2])
        # the first and last members' 40 lines come out; the damaged member's may come out up to the damage
        out[name] = Expect(-1, [], {"corrupt_input": 1})
    return out


def _page_damage(folder: Path) -> dict[str, Expect]:
    """300-page dumps with one bad page (an invalid UTF-8 byte, an unclosed tag), and a truncated .xml.gz."""
    pages = [(f"P{i}", 0, i, f"Page text {i}. " * 30) for i in range(1, 301)]
    xml = make_dump(pages).encode()
    bad_byte = xml.replace(b"Page text 150. ", b"Page text 150\xff ", 1)
    (folder / "bad_byte.xml").write_bytes(bad_byte)
    unclosed = xml.replace(b"<title>P150</title>", b"<title>P150", 1)
    (folder / "unclosed_tag.xml").write_bytes(unclosed)
    texts = [p[3] for p in pages]
    data = gzip.compress(xml, mtime=0)
    (folder / "truncated_pages.xml.gz").write_bytes(data[: len(data) * 2 // 3])
    return {
        "bad_byte.xml": Expect(
            300,
            ["Page text 150\ufffd" if i == 149 else t for i, t in enumerate(texts)],
            noted={"bad_utf8_replaced": 1},
        ),
        "unclosed_tag.xml": Expect(300, texts[:149] + texts[150:], {"malformed_xml": 1}),
        "truncated_pages.xml.gz": Expect(-1, [], {"truncated_input": 1}),
    }


def _warc_damage(folder: Path) -> dict[str, Expect]:
    records = [warc_record("warcinfo", "", b"software: test\r\n", http=False)]
    for i in range(6):
        records += [
            warc_record("request", f"https://x.test/{i}", b"GET / HTTP/1.1\r\n\r\n"),
            warc_record("response", f"https://x.test/{i}", html_response(i)),
        ]
    broken = list(records)
    broken[6] = broken[6].replace(
        b"WARC/1.0\r\n", b"WARC/garbage\r\nnot a header line\r\n", 1
    )  # page 2's response
    (folder / "broken_header.warc.gz").write_bytes(warc_gz(broken))
    whole = warc_gz(records)
    (folder / "truncated.warc.gz").write_bytes(whole[: len(whole) - 200])  # cut inside page 5's response
    pages = [f"Page {i}" for i in range(6)]
    return {
        "broken_header.warc.gz": Expect(
            13,
            [p for p in pages if p != "Page 2"],
            {"bad_warc_record": 1},
            {"warc_warcinfo": 1, "warc_request": 6},
        ),
        "truncated.warc.gz": Expect(
            13, pages[:5], {"truncated_record": 1}, {"warc_warcinfo": 1, "warc_request": 6}
        ),
    }


def make_multistream(folder: Path, pages: list[tuple[str, int, int, str]], per_stream: int = 10) -> Path:
    """A `*-multistream.xml.bz2` (header stream, page streams of `per_stream` pages, footer stream)
    and its `*-multistream-index.txt.bz2` (offset:page_id:title per page), as Wikimedia writes them."""
    xml = make_dump(pages)
    head, _, rest = xml.partition("\n")  # make_dump puts <mediawiki><siteinfo> on the first line
    body, footer = rest[: rest.rindex("</mediawiki>")], "</mediawiki>\n"
    page_lines = [line + "\n" for line in body.split("\n") if line]
    streams = [bz2.compress((head + "\n").encode())]
    index, offset = [], len(streams[0])
    for i in range(0, len(page_lines), per_stream):
        for t, _, pid, _ in pages[i : i + per_stream]:
            index.append(f"{offset}:{pid}:{t}\n")
        streams.append(bz2.compress("".join(page_lines[i : i + per_stream]).encode()))
        offset += len(streams[-1])
    streams.append(bz2.compress(footer.encode()))
    dump = folder / "testwiki-pages-articles-multistream.xml.bz2"
    dump.write_bytes(b"".join(streams))
    (folder / "testwiki-pages-articles-multistream-index.txt.bz2").write_bytes(
        bz2.compress("".join(index).encode())
    )
    return dump
