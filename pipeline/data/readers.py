"""Readers: stream one input file into Documents, counting every record they skip or cannot read.

`WikipediaReader` streams a MediaWiki XML export (`.xml`, `.xml.bz2` or `.xml.gz`) with
`ElementTree.iterparse`, so memory stays flat however big the dump: each `<page>` is cleared
after use and so is the root (which would otherwise keep one emptied child per page). Only
articles (namespace 0) that are neither redirects nor disambiguation pages become documents; the rest are counted as drops.
A damaged file (truncated bz2, malformed XML, not XML at all) keeps the pages read before the
damage, counts one error, logs the file and position, and ends the file; the runner decides
whether the shard's error fraction is acceptable.
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
from pipeline.errors import DataError

log = logging.getLogger(__name__)

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
REDIRECT_RE = re.compile(r"\s*#\s*redirect\b", re.IGNORECASE)
# {{Disambiguation}}, {{disambig|...}}, {{dab}}, {{hndis}}, {{geodis}}, {{numberdis}} and the like
DISAMBIG_RE = re.compile(
    r"\{\{\s*(?:disambiguation|disambig|disamb|dab|[a-z]*dis|[a-z -]*disambiguation)\s*(?:\||\}\})", re.I
)
_URL_SAFE = ";:@$!*(),/~'"  # what MediaWiki leaves unescaped in titles
_STRIP_SUFFIXES = {".bz2", ".gz", ".zst", ".xz", ".xml", ".jsonl", ".json", ".txt"}


def input_stem(path: str | Path) -> str:
    """The file name without compression/format suffixes: `enwiki-x.xml.bz2` -> `enwiki-x`."""
    name = Path(path).name
    while (suffix := Path(name).suffix.lower()) in _STRIP_SUFFIXES:
        name = name[: -len(suffix)]
    return name or Path(path).name


class _ByteCounter:
    """A read-only wrapper that counts the (decompressed) bytes handed to the XML parser."""

    def __init__(self, fh):
        self.fh, self.n = fh, 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.n += len(data)
        return data


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
        self._root_seen = False

    def __iter__(self) -> Iterator[Document]:
        if self.path.stat().st_size == 0:
            log.warning("%s: empty file, no documents", self.path)
            return
        raw, stream = self._open()
        counter = _ByteCounter(stream)
        try:
            yield from self._pages(ET.iterparse(counter, events=("start", "end")))
        except ET.ParseError as exc:
            self._parse_error(exc, counter)
        except EOFError as exc:
            self._stream_error("truncated_input", f"compressed stream ends early ({exc})", raw, counter)
        except OSError as exc:  # bz2 "Invalid data stream", gzip BadGzipFile
            self._stream_error("corrupt_input", str(exc), raw, counter)
        finally:
            stream.close()
            raw.close()

    def _open(self):
        if self.byte_range is None:
            return _open_raw(self.path)
        from pipeline.data.multistream import RangeStream, root_tag

        start, end = self.byte_range
        head = root_tag(self.path)
        raw = open(self.path, "rb")  # noqa: SIM115 - closed by __iter__
        return raw, RangeStream(raw, start, end, head)

    def _pages(self, events) -> Iterator[Document]:
        root, ns = None, ""
        for event, el in events:
            if root is None:
                root, ns = el, el.tag[: el.tag.rfind("}") + 1]
                self._root_seen = True
                if _local(el.tag) != "mediawiki":
                    self._error("not_mediawiki", f"root element is <{_local(el.tag)}>, not <mediawiki>")
                    return
                continue
            if event != "end" or el.tag != ns + "page":
                continue
            doc = self._one_page(el, ns)
            el.clear()
            root.clear()  # drop the emptied page from the root too: memory stays flat
            if doc is not None:
                yield doc

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

    def _parse_error(self, exc: ET.ParseError, counter: _ByteCounter) -> None:
        if counter.n == 0:
            log.warning("%s: empty input (no XML at all), no documents", self.path)
            return
        reason = "malformed_xml" if self._root_seen else "not_xml"
        # str(exc) already says "... line L, column C"
        self._error(
            reason, f"{exc} (about {counter.n} bytes read); kept the {self.counts.kept} pages before it"
        )

    def _stream_error(self, reason: str, detail: str, raw, counter: _ByteCounter) -> None:
        self._error(
            reason,
            f"{detail} at compressed byte {raw.tell()} (decompressed byte {counter.n}); "
            f"kept the {self.counts.kept} pages before it",
        )
