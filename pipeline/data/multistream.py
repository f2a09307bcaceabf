"""Wikipedia multistream dumps: split one `.xml.bz2` into byte ranges that are read independently.

A `*-multistream.xml.bz2` is a concatenation of independent bz2 streams of 100 pages each, and
its `*-multistream-index.txt.bz2` lists `offset:page_id:title` per page, where offset is the byte
position of the stream holding the page (notes/data-libs-facts.md §5). The first stream holds
`<mediawiki>` and `<siteinfo>`, the last one `</mediawiki>`. `stream_ranges` groups the page
streams into ranges of `streams_per_task`; `RangeStream` decompresses one range and wraps it in
the dump's own `<mediawiki ...>` start tag, so the ordinary XML reader parses it. One dump then
keeps every Ray worker busy, and the ranges (so the output) depend only on the index and config.
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path

from pipeline.errors import DataError

_CHUNK = 1 << 20
_ROOT_TAG = re.compile(rb"<mediawiki\b[^>]*>")


def index_path(path: Path) -> Path | None:
    """The `...-index.txt.bz2` beside a `...multistream.xml.bz2`, or None (not a multistream dump)."""
    name = path.name
    if not name.endswith("multistream.xml.bz2"):
        return None
    index = path.with_name(name[: -len(".xml.bz2")] + "-index.txt.bz2")
    return index if index.is_file() else None


def stream_ranges(path: Path, streams_per_task: int) -> list[tuple[int, int]]:
    """[(start, end)) byte ranges of the page streams, `streams_per_task` streams each."""
    index = index_path(path)
    if index is None:
        raise DataError(f"{path}: no multistream index beside it")
    offsets: set[int] = set()
    with bz2.open(index, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            head = line.split(":", 1)[0]
            if not head.isdigit():
                raise DataError(f"{index}: line {n} is not offset:page_id:title: {line[:80]!r}")
            offsets.add(int(head))
    starts = sorted(offsets)
    if not starts:
        return []
    bounds = [*starts[::streams_per_task], _footer_start(path, starts[-1])]
    return list(zip(bounds[:-1], bounds[1:]))


def _footer_start(path: Path, last_start: int) -> int:
    """End of the last page stream: where the footer stream (`</mediawiki>`) starts, or the file end."""
    with open(path, "rb") as fh:
        fh.seek(last_start)
        dec, pos = bz2.BZ2Decompressor(), last_start
        while not dec.eof and (chunk := fh.read(_CHUNK)):
            dec.decompress(chunk)
            pos += len(chunk)
        return pos - len(dec.unused_data) if dec.eof else pos


def root_tag(path: Path) -> bytes:
    """The dump's `<mediawiki ...>` start tag (namespaces, xml:lang), from its first (header) stream."""
    dec, head = bz2.BZ2Decompressor(), b""
    with open(path, "rb") as fh:
        while not dec.eof and not _ROOT_TAG.search(head) and (chunk := fh.read(1 << 16)):
            head += dec.decompress(chunk)
    m = _ROOT_TAG.search(head)
    if m is None:
        raise DataError(f"{path}: no <mediawiki> start tag in the header stream")
    return m.group()


class RangeStream:
    """A read()-able stream: start tag, the decompressed streams of [start, end), `</mediawiki>`."""

    def __init__(self, raw, start: int, end: int, head: bytes):
        self.raw, self.left = raw, end - start
        raw.seek(start)
        self.dec = bz2.BZ2Decompressor()
        self.buf = head
        self.done = False

    def read(self, size: int = -1) -> bytes:
        while not self.done and (size < 0 or len(self.buf) < size):
            self._fill()
        size = len(self.buf) if size < 0 else size
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def _fill(self) -> None:
        chunk = self.raw.read(min(_CHUNK, self.left)) if self.left > 0 else b""
        self.left -= len(chunk)
        while chunk:
            if self.dec.eof:  # the next stream of the range
                self.dec = bz2.BZ2Decompressor()
            self.buf += self.dec.decompress(chunk)
            chunk = self.dec.unused_data if self.dec.eof else b""
        if self.left <= 0:
            if not self.dec.eof:
                raise EOFError("a bz2 stream of the range ends early")
            self.buf += b"</mediawiki>"
            self.done = True

    def close(self) -> None:
        pass
