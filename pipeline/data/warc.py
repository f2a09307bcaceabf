"""WARC and WET readers, and the HTML main-content extraction stage.

`WarcReader` streams a `.warc` / `.warc.gz` (FastWARC when installed, warcio otherwise) and turns
each HTTP 200 HTML `response` record into a document whose text is the decoded HTML; the
`HtmlExtractor` stage then keeps the main content (Resiliparse by default, trafilatura as an
option). With `wet=True` it reads `conversion` records (Common Crawl WET: text already extracted).

Decoding order (notes/data-libs-facts.md §2): the HTTP charset, then Resiliparse's detection with
the HTML `<meta>` first. Damage is counted, never fatal:
- a record whose header cannot be parsed (`bad_warc_record`): the reader resynchronizes at the next
  gzip member (or `WARC/1.` line) and keeps every record after it;
- a file cut in the middle of its last record (`truncated_record`): the partial record is not kept.
Records that are not documents (request, warcinfo, metadata, non-HTML responses) are counted as
drops by type, so records in = kept + dropped + errors holds for the file.
"""

from __future__ import annotations

import codecs
import logging
import mmap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.data.document import Counts, Document
from pipeline.data.stage import Stage
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HTML_TYPES = ("text/html", "application/xhtml+xml")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_MAGIC = b"WARC/1."


@dataclass
class RawRecord:
    """One WARC record, reduced to what the reader needs (the same for both back ends)."""

    offset: int
    type: str
    headers: dict[str, str]  # WARC headers, lower-case names
    status: int | None = None
    content_type: str = ""  # HTTP (or WARC, for WET) content type, lower case, without parameters
    charset: str | None = None
    body: bytes = b""


def _split_content_type(value: str | None) -> tuple[str, str | None]:
    parts = [p.strip() for p in (value or "").split(";")]
    charset = next(
        (p.split("=", 1)[1].strip("\"' ") for p in parts[1:] if p.lower().startswith("charset=")), None
    )
    return parts[0].lower(), charset or None


def _fastwarc_records(fh, max_bytes: int) -> Iterator[RawRecord]:
    from fastwarc.warc import ArchiveIterator

    for rec in ArchiveIterator(fh, parse_http=True, auto_decode="all"):
        kind = str(rec.record_type)
        headers = {k.lower(): v for k, v in rec.headers}
        out = RawRecord(rec.stream_pos, kind, headers)
        if kind in ("response", "conversion", "resource"):
            if rec.content_length > max_bytes:
                out.type = "too_large"
                yield out
                continue
            http = rec.http_headers if kind == "response" else None
            out.status = http.status_code if http is not None else None
            ctype = http.get("Content-Type") if http is not None else headers.get("content-type")
            out.content_type, out.charset = _split_content_type(ctype)
            out.body = rec.reader.read()
        yield out


def _warcio_records(fh, max_bytes: int) -> Iterator[RawRecord]:
    from warcio.archiveiterator import ArchiveIterator

    it = ArchiveIterator(fh)
    for rec in it:
        headers = {k.lower(): v for k, v in rec.rec_headers.headers}
        out = RawRecord(0, rec.rec_type, headers)
        if rec.rec_type in ("response", "conversion", "resource"):
            if int(headers.get("content-length", 0) or 0) > max_bytes:
                out.type = "too_large"
            else:
                http = rec.http_headers if rec.rec_type == "response" else None
                out.status = int(http.get_statuscode()) if http is not None else None
                ctype = http.get_header("Content-Type") if http is not None else headers.get("content-type")
                out.content_type, out.charset = _split_content_type(ctype)
                out.body = rec.content_stream().read()
        out.offset = it.get_record_offset()  # only after the payload: asking first skips it
        yield out


def backend() -> str:
    """ "fastwarc" when it is installed (2-3x faster), else "warcio"."""
    try:
        import fastwarc.warc  # noqa: F401

        return "fastwarc"
    except ImportError:
        return "warcio"


def decode_html(body: bytes, charset: str | None) -> tuple[str, str]:
    """(text, encoding used): the HTTP charset when Python knows it, else detection with <meta> first."""
    if charset:
        try:
            name = codecs.lookup(charset).name
            return body.decode(name, errors="replace"), name
        except LookupError:
            pass  # an unknown label ("utf8mb4", "none"): detect instead
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    enc = detect_encoding(body, from_html_meta=True)
    return bytes_to_str(body, enc), enc


class WarcReader:
    """Iterate the documents of one WARC (HTML responses) or WET (conversion records) file."""

    name = "read"

    def __init__(self, path: str | Path, max_record_bytes: int = 50_000_000, wet: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"input file not found: {self.path}")
        self.site: dict = {}
        self.counts = Counts()
        self.wet = wet
        self.max_bytes = max_record_bytes
        self.gzipped = self.path.suffix == ".gz"
        self._records = _fastwarc_records if backend() == "fastwarc" else _warcio_records

    def __iter__(self) -> Iterator[Document]:
        if self.path.stat().st_size == 0:
            log.warning("%s: empty file, no documents", self.path)
            return
        pending: RawRecord | None = None
        for rec in self._resyncing_records():
            if pending is not None:
                yield from self._finish(pending)
            pending = rec
        if pending is not None:
            if self._tail_complete(pending.offset):
                yield from self._finish(pending)
            else:
                self._error("truncated_record", pending.offset, "the file ends inside this record")

    def _resyncing_records(self) -> Iterator[RawRecord]:
        """All records; after a damaged one, start again at the next record boundary."""
        start, last_good = 0, -1
        with open(self.path, "rb") as fh:
            while start is not None:
                fh.seek(start)
                try:
                    for rec in self._records(fh, self.max_bytes):
                        last_good = rec.offset
                        yield rec
                    return
                except Exception as exc:  # noqa: BLE001 - each back end fails its own way on damage
                    bad = self._next_boundary(last_good + 1)
                    start = self._next_boundary(bad + 1) if bad is not None else None
                    cut = start is None and bad is not None and not self._tail_complete(bad)
                    reason = "truncated_record" if cut else "bad_warc_record"
                    where = bad if bad is not None else last_good
                    self._error(reason, where, f"{type(exc).__name__}: {exc}")
                    last_good = start - 1 if start is not None else last_good

    def _next_boundary(self, pos: int) -> int | None:
        magic = _GZIP_MAGIC if self.gzipped else _WARC_MAGIC
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            found = mm.find(magic, max(pos, 0))
        return None if found < 0 else found

    def _tail_complete(self, offset: int) -> bool:
        """False when the last gzip member (the one holding the last record) is cut short."""
        if not self.gzipped:
            return True
        dec = zlib.decompressobj(31)
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            while (chunk := fh.read(1 << 20)) and not dec.eof:
                dec.decompress(chunk, 0)
        return dec.eof

    def _finish(self, rec: RawRecord) -> Iterator[Document]:
        out = self._to_document(rec)
        if isinstance(out, Document):
            self.counts.kept += 1
            yield out
        elif out.startswith("error:"):
            self._error(out[6:], rec.offset, f"{rec.type} record skipped")
        else:
            self.counts.drop(out)

    def _to_document(self, rec: RawRecord) -> Document | str:
        if rec.type == "too_large":
            return "error:record_too_large"
        wanted = "conversion" if self.wet else "response"
        if rec.type != wanted:
            return f"warc_{rec.type}"
        url = rec.headers.get("warc-target-uri", "").strip("<> ")
        meta = {"url": url, "timestamp": rec.headers.get("warc-date", "")}
        if self.wet:
            try:
                text = rec.body.decode("utf-8")
            except UnicodeDecodeError:
                return "error:bad_utf8"
            lang = rec.headers.get("warc-identified-content-language")
            if lang:
                meta["language"] = lang
        else:
            if rec.status != 200:
                return "http_status"
            if rec.content_type not in HTML_TYPES:
                return "not_html"
            text, meta["charset"] = decode_html(rec.body, rec.charset)
        return Document(id=f"{self.path.name}#{rec.offset}", text=text, source="web", meta=meta)

    def _error(self, reason: str, offset: int, detail: str) -> None:
        self.counts.error(reason)
        log.warning("%s: %s at byte %d: %s", self.path, reason, offset, detail)


class HtmlExtractor(Stage):
    """HTML to main-content text: Resiliparse `extract_plain_text(main_content=True)` or trafilatura."""

    name = "html"

    def __init__(self, method: str = "resiliparse"):
        if method == "trafilatura":
            try:
                import trafilatura  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "read.html_extractor", "trafilatura is not installed (pip install trafilatura)"
                ) from None
        elif method != "resiliparse":
            raise ConfigError("read.html_extractor", f"must be resiliparse or trafilatura, got {method!r}")
        self.method = method

    def process_one(self, doc: Document) -> Document | str:
        text = extract_main_text(doc.text, self.method)
        return replace(doc, text=text) if text and text.strip() else "no_main_content"


def extract_main_text(html: str, method: str = "resiliparse") -> str:
    """The main content of an HTML page as plain text ("" when there is none)."""
    if method == "trafilatura":
        import trafilatura

        return trafilatura.extract(html, favor_precision=True, include_comments=False, fast=True) or ""
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True)
