"""Readers: stream one input file into Documents, counting every record they skip or cannot read.

`WikipediaReader` streams a MediaWiki XML export (`.xml`, `.xml.bz2` or `.xml.gz`) page by
page: `page_chunks` cuts the decompressed bytes at each `<page>` start tag (page text is escaped,
so the tag never occurs inside it) and each page is parsed on its own, so memory holds one page
however big the dump, and damage costs only the page it is in. A page with an invalid UTF-8 byte
is decoded with U+FFFD in its place (counted in `counts.noted["bad_utf8_replaced"]`, logged); a
page that does not parse (an unclosed or mismatched tag, no `</page>`) is one `malformed_xml`
error, logged with the file and byte offset, and reading resynchronizes at the next `<page>`.
A damaged compressed member is skipped the same way (pipeline/data/streams.py, `corrupt_input`);
a truncated file keeps every complete page before the cut (`truncated_input`). Only articles
(namespace 0) that are neither redirects nor disambiguation pages become documents; the rest are
counted as drops. The runner decides whether a shard's error fraction is acceptable.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

from pipeline.data.document import Counts, Document
from pipeline.data.streams import breaks_of, open_stream
from pipeline.errors import DataError

log = logging.getLogger(__name__)

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
REDIRECT_RE = re.compile(r"\s*#\s*redirect\b", re.IGNORECASE)
# {{Disambiguation}}, {{disambig|...}}, {{dab}}, {{hndis}}, {{geodis}}, {{numberdis}} and the like
DISAMBIG_RE = re.compile(
    r"\{\{\s*(?:disambiguation|disambig|disamb|dab|[a-z]*dis|[a-z -]*disambiguation)\s*(?:\||\}\})", re.I
)
_PAGE_START = re.compile(rb"<page[\s>]")
_FIRST_TAG = re.compile(rb"<(?![?!])([A-Za-z_][\w.:-]*)")  # the root element, after <?xml?> and <!-- -->
_READ = 1 << 20
_MAX_HEAD = 4 << 20  # bytes before the first <page> (siteinfo is a few kB)
_URL_SAFE = ";:@$!*(),/~'"  # what MediaWiki leaves unescaped in titles
_STRIP_SUFFIXES = {".bz2", ".gz", ".zst", ".xz", ".xml", ".jsonl", ".json", ".txt"}


def input_stem(path: str | Path) -> str:
    """The file name without compression/format suffixes: `enwiki-x.xml.bz2` -> `enwiki-x`."""
    name = Path(path).name
    while (suffix := Path(name).suffix.lower()) in _STRIP_SUFFIXES:
        name = name[: -len(suffix)]
    return name or Path(path).name


def _open_raw(path: Path):
    """(raw file, decompressed stream): the raw file's tell() is the compressed position."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    if path.suffix == ".bz2":
        return raw, bz2.BZ2File(raw)
    return raw, (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_siteinfo(path: str | Path) -> dict:
    """Dump header: dbname, base url, language, {namespace key: name}; {} when the dump has none."""
    path = Path(path)
    info: dict = {}
    raw, stream = _open_raw(path)
    try:
        for event, el in ET.iterparse(stream, events=("start", "end")):
            tag = _local(el.tag)
            if event == "start" and tag == "mediawiki" and el.get(XML_LANG):
                info["lang"] = el.get(XML_LANG)
            elif event == "start" and tag == "page":
                break
            elif event == "end" and tag == "siteinfo":
                info.update(_parse_siteinfo(el))
                break
    except (ET.ParseError, EOFError, OSError):
        pass  # the reader itself counts and logs the damage
    finally:
        stream.close()
        raw.close()
    return info


def _parse_siteinfo(el: ET.Element) -> dict:
    out: dict = {"namespaces": {}}
    for child in el:
        tag = _local(child.tag)
        if tag in ("dbname", "base", "sitename") and child.text:
            out[tag] = child.text.strip()
        elif tag == "namespaces":
            for ns in child:
                out["namespaces"][int(ns.get("key", "0"))] = (ns.text or "").strip()
    return out


def page_url(base: str | None, title: str) -> str | None:
    """Article URL from the siteinfo base (`https://en.wikipedia.org/wiki/Main_Page`), if it has a path."""
    parts = urlsplit(base or "")
    if not (parts.scheme and parts.netloc and "/" in parts.path):
        return None  # no base, or just a host: no article path to build on
    head = base[: base.rfind("/")]
    return head + "/" + quote(title.replace(" ", "_"), safe=_URL_SAFE)


class _BadRecord(Exception):
    """A page that cannot become a document for a reason counted as an error (not a drop)."""


class WikipediaReader:
    """Iterate the articles of one MediaWiki XML dump; counters end up in `self.counts`."""

    name = "read"

    def __init__(
        self, path: str | Path, skip_disambiguation: bool = True, byte_range: tuple[int, int] | None = None
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"input file not found: {self.path}")
        self.skip_disambiguation = skip_disambiguation
        self.byte_range = byte_range
        """Multistream dumps: read only the bz2 streams in [start, end) (see multistream.py)."""
        self.site = read_siteinfo(self.path)
        self.wiki = self.site.get("dbname") or input_stem(self.path)
        self.counts = Counts()

    def __iter__(self) -> Iterator[Document]:
        if self.path.stat().st_size == 0:
            log.warning("%s: empty file, no documents", self.path)
            return
        stream = self._open()
        offset = 0
        try:
            for kind, offset, data in page_chunks(stream):
                if kind == "head":
                    if not self._check_head(data):
                        return
                elif kind == "break":
                    self._error("corrupt_input", f"{data.decode()}; skipped to the next intact member")
                elif (doc := self._page_bytes(data, offset, complete=kind == "page")) is not None:
                    yield doc
        except EOFError as exc:
            self._stream_error("truncated_input", f"compressed stream ends early ({exc})", stream, offset)
        except OSError as exc:  # an unreadable file, a bz2 range that is not bz2
            self._stream_error("corrupt_input", str(exc), stream, offset)
        finally:
            stream.close()

    def _open(self):
        if self.byte_range is None:
            return open_stream(self.path)
        from pipeline.data.multistream import RangeStream, root_tag

        start, end = self.byte_range
        head = root_tag(self.path)
        return RangeStream(open(self.path, "rb"), start, end, head)  # noqa: SIM115 - closed with it

    def _check_head(self, head: bytes) -> bool:
        """True when the bytes before the first page open a <mediawiki> export; else counts why not."""
        m = _FIRST_TAG.search(head)
        if m is None:
            if head.strip():
                self._error("not_xml", f"no XML element in the first {len(head)} bytes")
            else:
                log.warning("%s: empty input (no XML at all), no documents", self.path)
            return False
        name = _local(m.group(1).decode("utf-8", "replace").rsplit(":", 1)[-1])
        if name != "mediawiki":
            self._error("not_mediawiki", f"root element is <{name}>, not <mediawiki>")
            return False
        return True

    def _page_bytes(self, data: bytes, offset: int, complete: bool = True) -> Document | None:
        """Parse one page's bytes (from `<page` to the next page) into a document, or count why not.
        `complete=False`: the bytes a truncated file ended in; only a finished page among them counts."""
        end = data.rfind(b"</page>")
        if end < 0:
            if complete:
                self._error(
                    "malformed_xml", f"page at byte {offset} has no </page>; resumed at the next <page>"
                )
            return None
        data = data[: end + len(b"</page>")]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = data.decode("utf-8", errors="replace")
            n = text.count("\ufffd") - data.count("\ufffd".encode())
            self.counts.note("bad_utf8_replaced", n)
            log.warning(
                "%s: page at byte %d: %d invalid UTF-8 bytes replaced by U+FFFD (%s)",
                self.path,
                offset,
                n,
                exc,
            )
        try:
            page = ET.fromstring(text)
        except ET.ParseError as exc:  # str(exc) says "line L, column C" within the page
            self._error("malformed_xml", f"page at byte {offset}: {exc}; resumed at the next <page>")
            return None
        return self._one_page(page, "")

    def _one_page(self, page: ET.Element, ns: str) -> Document | None:
        """Count the page as kept, dropped or errored; return the document when kept."""
        try:
            out = self._to_document(page, ns)
        except _BadRecord as exc:
            self._error(str(exc), f"page {page.findtext(ns + 'title')!r} skipped")
            return None
        if isinstance(out, str):
            self.counts.drop(out)
            return None
        self.counts.kept += 1
        return out

    def _to_document(self, page: ET.Element, ns: str) -> Document | str:
        title = (page.findtext(ns + "title") or "").strip()
        if (page.findtext(ns + "ns") or "0").strip() != "0":
            return "not_main_namespace"
        if page.find(ns + "redirect") is not None:
            return "redirect"
        revisions = page.findall(ns + "revision")
        rev = revisions[-1] if revisions else None  # history dumps: the newest revision is last
        text = rev.findtext(ns + "text") if rev is not None else None
        if not text or not text.strip():
            return "empty_text"
        if REDIRECT_RE.match(text):
            return "redirect"
        if self.skip_disambiguation and DISAMBIG_RE.search(text):
            return "disambiguation"
        page_id = (page.findtext(ns + "id") or "").strip()
        if not page_id:
            raise _BadRecord("missing_page_id")
        return Document(
            id=f"{self.wiki}/{page_id}", text=text, source="wikipedia", meta=self._meta(title, rev, ns)
        )

    def _meta(self, title: str, rev: ET.Element, ns: str) -> dict:
        meta = {"title": title}
        url = page_url(self.site.get("base"), title)
        if url:
            meta["url"] = url
        timestamp = (rev.findtext(ns + "timestamp") or "").strip()
        if timestamp:
            meta["timestamp"] = timestamp
        if self.site.get("lang"):
            meta["language"] = self.site["lang"]
        return meta

    def _error(self, reason: str, detail: str) -> None:
        self.counts.error(reason)
        log.warning("%s: %s: %s", self.path, reason, detail)

    def _stream_error(self, reason: str, detail: str, stream, offset: int) -> None:
        where = getattr(stream, "tell_compressed", None)
        at = f" at compressed byte {where()}" if where else ""
        self._error(
            reason,
            f"{detail}{at} (page at decompressed byte {offset}); kept the {self.counts.kept} pages before it",
        )


def page_chunks(stream) -> Iterator[tuple[str, int, bytes]]:
    """Cut a MediaWiki export into ("head", 0, bytes before the first page), then ("page", offset,
    bytes from one `<page` to the next) per page. A damaged span the stream skipped gives
    ("break", offset, why) and drops the page it cut; when the stream ends early, the bytes left
    come as ("tail", offset, bytes) before the EOFError. Offsets are decompressed bytes."""
    buf, base, scan, seen, head_done = b"", 0, 1, 0, False
    while True:
        try:
            data = stream.read(_READ)
        except EOFError:
            if head_done and buf:
                yield "tail", base, buf
            raise
        for where, why in breaks_of(stream)[seen:]:
            yield "break", base + len(buf), f"compressed byte {where}: {why}".encode()
            seen, base, buf, scan = seen + 1, base + len(buf), b"", 1  # the page the damage cut is lost
        if not data:
            break
        buf += data
        if not head_done:
            m = _PAGE_START.search(buf)
            if m is None and len(buf) < _MAX_HEAD:
                continue
            cut = m.start() if m is not None else len(buf)
            yield "head", 0, buf[:cut]
            head_done, base, buf = True, cut, buf[cut:]
        pos = 0
        while (m := _PAGE_START.search(buf, max(pos + 1, scan))) is not None:
            yield "page", base + pos, buf[pos : m.start()]
            pos = m.start()
        base, buf, scan = base + pos, buf[pos:], max(1, len(buf) - pos - 8)  # rescan only the new bytes
    if not head_done:
        yield "head", 0, buf
    elif buf:
        yield "page", base, buf
