"""WARC and WET readers, and the HTML main-content extraction stage.

`WarcReader` streams a `.warc` / `.warc.gz` (FastWARC when installed, warcio otherwise) and turns
each HTTP 200 HTML `response` record into a document whose text is the decoded HTML; the
`HtmlExtractor` stage then keeps the main content (Resiliparse by default, trafilatura as an
option). With `wet=True` it reads `conversion` records (Common Crawl WET: text already extracted).

Both back ends only frame records: the HTTP message is parsed and its body decoded here, the same
way on both paths (`http.py`: chunked framing checked against the bytes, gzip / deflate / br /
zstd, stacked), and the text decoded as a browser would (`charset.py`). Document ids are
`<file name>#<record position>` (see `warc_frame.py`: the byte or gzip-member offset).

Every record is counted once (records in = kept + dropped + errors), under reasons that say where
it stopped, so the report can show per file why few documents came out:
- `warc_<type>` (dropped): not the wanted record type (request, metadata, warcinfo...);
  `warc_not_http` a response record that holds no HTTP message (`dns:` lookups);
- `http_*`: HTTP responses. Dropped: `http_status` (not 200), `http_content_type` (not HTML; a
  missing type is sniffed). Errors: `http_bad_header`, `http_bad_<coding>` (nothing of the body
  decodes), `http_unknown_encoding`, `http_body_too_large`;
- damage, errors: `bad_warc_record` (no readable header, or junk between records),
  `bad_warc_length` (the Content-Length lies: the record is dropped, reading resumes at the next
  `WARC/1.x` header, which keeps the next intact record), `truncated_record` (the file ends
  inside it), `record_too_large` (over `max_record_bytes`).
Documents carry in `meta` their `url` (`WARC-Target-URI` without `<...>`), `charset`, `charset_source`
and `replacements` (U+FFFD the decoder inserted), and `body_incomplete` when the body was cut short
(`WARC-Truncated`, or a chunked or compressed stream that ends early).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.data.charset import decode, decode_html
from pipeline.data.document import Counts, Document
from pipeline.data.http import HttpError, decode_body, parse_response
from pipeline.data.stage import Stage
from pipeline.data.warc_frame import Frame, Layout, open_layout
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HTML_TYPES = ("text/html", "application/xhtml+xml")
WARC_TYPES = {
    "warcinfo",
    "response",
    "resource",
    "request",
    "metadata",
    "revisit",
    "conversion",
    "continuation",
}
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")


@dataclass
class RawRecord:
    """One WARC record, reduced to what the reader needs (the same for both back ends)."""

    offset: int
    type: str
    headers: dict[str, str]
    """WARC headers, lower-case names."""
    length: int = 0
    """The declared Content-Length."""
    block: bytes | None = None
    """The record block (a response's whole HTTP message); None when over the size limit (not read)."""
    suspect: bool = False
    """The back end saw bytes it did not expect right after this record."""


class _Unreadable(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _fastwarc_records(fh, max_bytes: int) -> Iterator[RawRecord]:
    from fastwarc.warc import ArchiveIterator

    for rec in ArchiveIterator(fh, parse_http=False):
        headers = {k.lower(): v for k, v in rec.headers}
        n = rec.content_length
        block = rec.reader.read() if n <= max_bytes else None
        yield RawRecord(rec.stream_pos, _record_type(headers), headers, n, block)


def _warcio_records(fh, max_bytes: int) -> Iterator[RawRecord]:
    from warcio.archiveiterator import ArchiveIterator

    it = ArchiveIterator(fh, no_record_parse=True)
    for rec in it:
        headers = {k.lower(): v for k, v in rec.rec_headers.headers}
        n, errors = int(headers.get("content-length") or 0), it.err_count
        block = rec.raw_stream.read() if n <= max_bytes else None
        offset = it.get_record_offset()  # only after the block: it reads on to the next record
        yield RawRecord(offset, _record_type(headers), headers, n, block, it.err_count > errors)


def _record_type(headers: dict[str, str]) -> str:
    kind = headers.get("warc-type", "").strip().lower()
    return kind if kind in WARC_TYPES else "other"


def backend() -> str:
    """ "fastwarc" when it is installed (2-3x faster), else "warcio"."""
    try:
        import fastwarc.warc  # noqa: F401

        return "fastwarc"
    except ImportError:
        return "warcio"


def target_uri(headers: dict[str, str]) -> str:
    """`WARC-Target-URI`, without the `<...>` an early WARC draft (and wget) wraps it in."""
    uri = headers.get("warc-target-uri", "").strip()
    return uri[1:-1].strip() if uri.startswith("<") and uri.endswith(">") else uri


def html_of_response(block: bytes, max_bytes: int) -> tuple[str, dict] | str:
    """(HTML text, meta) of an HTTP 200 HTML response, or the drop reason; HttpError when unreadable."""
    resp = parse_response(block)
    if resp is None:
        return "warc_not_http"
    if resp.status != 200:
        return "http_status"
    ctype, charset = resp.content_type()
    if ctype and ctype not in HTML_TYPES:
        return "http_content_type"
    body, complete = decode_body(resp, max_bytes)
    if not ctype and not body[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_STARTS):
        return "http_content_type"  # no Content-Type and not HTML by its first bytes
    page = decode_html(body, charset)
    meta = {"charset": page.codec, "charset_source": page.source, "replacements": page.replacements}
    if not complete:
        meta["body_incomplete"] = True
    return page.text, meta


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
        self._records = _fastwarc_records if backend() == "fastwarc" else _warcio_records
        self.layout: Layout | None = None

    def __iter__(self) -> Iterator[Document]:
        if self.path.stat().st_size == 0:
            log.warning("%s: empty file, no documents", self.path)
            return
        with open_layout(self.path) as self.layout:
            for rec in self._framed_records():
                yield from self._finish(rec)

    def _framed_records(self) -> Iterator[RawRecord]:
        """Every record whose framing holds; damage is counted and reading resumes at the next header."""
        pos: int | None = 0
        while pos is not None:
            pos = yield from self._records_from(pos)

    def _records_from(self, start: int) -> Generator[RawRecord, None, int | None]:
        """Records from `start` to the end (returns None) or to damage (returns where to go on)."""
        pending = None  # held back until the back end reads past it: damage right after it may be its own
        with self.layout.open(start) as fh:
            records = self._records(fh, self.max_bytes)
            while True:
                try:
                    rec = next(records)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - each back end fails its own way on damage
                    return (yield from self._after_failure(pending, start, exc))
                if pending is not None:
                    yield pending
                    pending = None
                if self._suspect(rec):
                    frame = self.layout.check(rec.offset)
                    if frame.verdict != "ok":
                        self._error(frame.verdict, rec.offset, frame.detail)
                        return self.layout.next_start(rec.offset + 1)
                    if not frame.clean_tail:
                        yield rec
                        return self._skip_junk(rec.offset, frame, "the back end skipped them")
                pending = rec
        if pending is not None:
            yield pending
        return None

    def _suspect(self, rec: RawRecord) -> bool:
        """Worth checking the framing: a header cut short, a block that is not its declared length or
        that swallowed the next record's header."""
        if rec.suspect or rec.block is None or "content-length" not in rec.headers:
            return True
        return len(rec.block) != rec.length or b"\r\n\r\nWARC/" in rec.block

    def _after_failure(
        self, pending: RawRecord | None, start: int, exc: Exception
    ) -> Generator[RawRecord, None, int | None]:
        """The back end stopped right after `pending` (or at `start`): count the damage, say where to go on."""
        cause = f"{type(exc).__name__}: {ascii(str(exc)[:160])}"  # warcio quotes the bytes it choked on
        at = start if pending is None else pending.offset
        frame = self.layout.check(at)
        if frame.verdict != "ok":
            # no header, or its length lied and the back end read on from the wrong place
            self._error(frame.verdict, at, f"{frame.detail} ({cause})")
            return self.layout.next_start(at + 1)
        if pending is None:
            # sound by its framing but refused by the back end: read it without the back end
            headers, length, block = self.layout.read_record(start, self.max_bytes)
            pending = RawRecord(start, _record_type(headers), headers, length, block)
        yield pending
        return self._skip_junk(at, frame, cause)

    def _skip_junk(self, offset: int, frame: Frame, cause: str) -> int | None:
        """The next record header after the sound record at `offset`; bytes between its end and that
        header (junk, a garbage header, a damaged gzip member) are counted as one bad_warc_record."""
        nxt = self.layout.next_start(offset + 1)
        stop = nxt if nxt is not None else self.layout.size()
        if not frame.clean_tail or (frame.end is not None and stop is not None and frame.end < stop):
            where = frame.end if frame.end is not None else offset
            self._error("bad_warc_record", where, f"bytes that are not a WARC record ({cause})")
        return nxt

    def _finish(self, rec: RawRecord) -> Iterator[Document]:
        try:
            out = self._to_document(rec)
        except (HttpError, _Unreadable) as exc:
            self._error(exc.reason, rec.offset, f"{rec.type} record {target_uri(rec.headers)}: {exc}")
            return
        if isinstance(out, Document):
            self.counts.kept += 1
            yield out
        else:
            self.counts.drop(out)

    def _to_document(self, rec: RawRecord) -> Document | str:
        wanted = "conversion" if self.wet else "response"
        if rec.type != wanted:
            return f"warc_{rec.type}"
        if rec.block is None:
            raise _Unreadable(
                "record_too_large", f"{rec.length:,} bytes > max_record_bytes={self.max_bytes:,}"
            )
        meta = {"url": target_uri(rec.headers), "timestamp": rec.headers.get("warc-date", "")}
        if self.wet:
            page = decode(rec.block, "utf-8", "warc")
            text, meta["replacements"] = page.text, page.replacements
            if lang := rec.headers.get("warc-identified-content-language"):
                meta["language"] = lang
        else:
            out = html_of_response(rec.block, self.max_bytes)
            if isinstance(out, str):
                return out
            text, more = out
            meta.update(more)
            if "warc-truncated" in rec.headers:
                meta["body_incomplete"] = True
        return Document(id=f"{self.path.name}#{rec.offset}", text=text, source="web", meta=meta)

    def _error(self, reason: str, offset: int, detail: str) -> None:
        self.counts.error(reason)
        log.warning("%s: %s at %s: %s", self.path, reason, self.layout.where(offset), detail)


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
