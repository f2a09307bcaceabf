"""WARC framing: where records start, and whether a record's declared length holds.

The reader leaves ordinary records to its back end (FastWARC or warcio) and turns here when one
looks wrong: a back end error, a block shorter than its Content-Length, a block that holds the next
record's header. `Layout.check(pos)` then reads the record's header itself and looks at the bytes at
its declared end: two CRLF and the next `WARC/1.x` line (or the end of the data) mean the length
holds; anything else means the header lied (too long or too short) and the record is dropped.
`Layout.next_start(pos)` finds the next record header, where the reader starts its back end again.

A record's *position* is what the back ends report, in one of three layouts:
- an uncompressed WARC: the byte offset in the file;
- one gzip member per record (Common Crawl and every crawler): the member's byte offset in the file,
  the offset a CDX index gives, and the back end is restarted on a member boundary;
- a WARC gzipped as a whole (`gzip x.warc`), whose members do not line up with records: the offset
  in the decompressed stream (the back end then reads a decompressing stream).
"""

from __future__ import annotations

import gzip
import io
import mmap
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b\x08"
VERSION_LINE = re.compile(rb"WARC/\d+\.\d+\r?\n")
_LENGTH = re.compile(rb"^content-length:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
MAX_HEADER = 1 << 16  # a WARC header longer than this is garbage
_STEP = 1 << 20  # bytes per read while scanning or inflating


@dataclass(frozen=True)
class Frame:
    verdict: str
    """"ok", or the error reason: bad_warc_record (no header), bad_warc_length, truncated_record."""
    clean_tail: bool = True
    """Only line breaks follow the declared end (not junk) before the next record or the end."""
    end: int | None = None
    """Where the next record should start: after this one's trailing line breaks, or after its gzip
    member (one member per record); None when unknown."""
    detail: str = ""


class Layout:
    """A WARC file as records at positions (see the module docstring); subclasses say how to read."""

    name = "byte"

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        self.mm.close()
        self._fh.close()

    def __enter__(self) -> Layout:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, pos: int) -> BinaryIO:
        """A file object for the back end, at the record at `pos`."""
        fh = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        fh.seek(pos)
        return fh

    def read(self, pos: int, skip: int, n: int) -> bytes:
        """Up to `n` bytes of WARC data from `skip` bytes into the record at `pos` (fewer at the end)."""
        return self.mm[pos + skip : pos + skip + n]

    def next_start(self, pos: int) -> int | None:
        """The position of the first record header at or after `pos`, or None."""
        while True:
            base = max(pos - 1, 0)  # one byte before `pos`: is `pos` a line start?
            window = self.read(base, 0, _STEP + 64)
            full = len(window) == _STEP + 64
            limit = pos + _STEP if full else base + len(window)
            i = window.find(b"WARC/", pos - base)
            while i >= 0 and base + i < limit:
                if (base + i == 0 or window[i - 1] == 0x0A) and VERSION_LINE.match(window, i):
                    return base + i
                i = window.find(b"WARC/", i + 1)
            if not full:
                return None
            pos += _STEP

    def check(self, pos: int) -> Frame:
        """Does the record at `pos` have a header, and does its declared length end on a boundary?"""
        stop = self._declared_end(pos, self.read(pos, 0, MAX_HEADER))
        if isinstance(stop, Frame):
            return stop
        after = self.read(pos, stop - 1, 66)  # the block's last byte, then what follows it
        if not after:
            return self._ends_early(pos, stop)
        tail = after[1:]
        rest = tail.lstrip(b"\r\n")
        if VERSION_LINE.match(rest) or (not rest and len(after) < 66):
            return Frame("ok", True, pos + stop + len(tail) - len(rest))
        if tail.startswith(b"\r\n\r\n"):
            return Frame("ok", False, pos + stop + 4)  # a sound record, then junk
        return Frame("bad_warc_length", False, None, "the Content-Length ends inside the data")

    def _declared_end(self, pos: int, head: bytes) -> int | Frame:
        """Bytes from the record's start to the end of its block, by its header; or why it has none."""
        if not VERSION_LINE.match(head):
            return Frame("bad_warc_record", False, None, "no WARC/1.x line where a record should start")
        end = head.find(b"\r\n\r\n")
        length = _LENGTH.search(head, 0, end) if end >= 0 else None
        if length is None:
            if end < 0 and len(head) < MAX_HEADER and self.next_start(pos + 1) is None:
                return Frame("truncated_record", False, None, "the data ends inside the WARC header")
            return Frame("bad_warc_record", False, None, "no end of header or no Content-Length")
        return end + 4 + int(length.group(1))

    def _ends_early(self, pos: int, stop: int) -> Frame:
        reason = "bad_warc_length" if self.next_start(pos + 1) is not None else "truncated_record"
        return Frame(reason, False, None, f"the data ends before the declared end ({stop:,} bytes in)")

    def size(self) -> int | None:
        """Where positions end (None when unknown without reading everything)."""
        return len(self.mm)

    def read_record(self, pos: int, max_bytes: int) -> tuple[dict[str, str], int, bytes | None]:
        """(headers with lower-case names, declared length, block or None when over `max_bytes`) of a
        record `check` found sound: the reader reads one itself when its back end refuses it."""
        head = self.read(pos, 0, MAX_HEADER)
        end = head.find(b"\r\n\r\n")
        lines = head[:end].decode("utf-8", errors="replace").split("\r\n")[1:]
        fields = (line.partition(":") for line in lines)
        headers = {name.strip().lower(): value.strip() for name, colon, value in fields if colon}
        length = int(headers["content-length"])
        return headers, length, self.read(pos, end + 4, length) if length <= max_bytes else None

    def where(self, pos: int) -> str:
        """`pos` in words for a log line."""
        return f"{self.name} {pos}"


class MemberLayout(Layout):
    """One gzip member per record: positions are member offsets in the compressed file."""

    def read(self, pos: int, skip: int, n: int) -> bytes:
        out = bytearray()
        for chunk in self._inflated(pos):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            out += chunk[skip : skip + n - len(out)]
            skip = 0
            if len(out) >= n:
                break
        return bytes(out)

    def _inflated(self, pos: int) -> Iterator[bytes]:
        """Decompressed data from the member at `pos` on, across members, until the end or damage."""
        d, data, off = zlib.decompressobj(31), b"", pos
        while True:
            if not data:
                if off >= len(self.mm):
                    return
                data, off = self.mm[off : off + _STEP], off + _STEP
            try:
                out = d.decompress(data, _STEP)
            except zlib.error:
                return
            if out:
                yield out
            if d.eof:
                data, d = d.unused_data, zlib.decompressobj(31)
            else:
                data = d.unconsumed_tail

    def check(self, pos: int) -> Frame:
        """As `Layout.check`, within the record's own gzip member."""
        stop = self._declared_end(pos, self._member(pos, 0, MAX_HEADER)[0])
        if isinstance(stop, Frame):
            return stop
        after, size, end = self._member(pos, stop - 1, 66)
        if size < stop:
            if end is None and self.next_start(pos + 1) is not None:
                return Frame("bad_warc_record", False, None, "the gzip member is damaged")
            return self._ends_early(pos, stop)
        tail = after[1:]
        if not tail.strip(b"\r\n") and size < stop + 65:
            return Frame("ok", True, end)
        if tail.startswith(b"\r\n\r\n"):
            return Frame("ok", False, end)  # a sound record, then junk in the same member
        return Frame("bad_warc_length", False, None, "the Content-Length ends inside the data")

    def _member(self, pos: int, skip: int, n: int) -> tuple[bytes, int, int | None]:
        """(`n` bytes from `skip` into the gzip member at `pos`, its inflated size, the offset where it
        ends or None when it is cut or damaged); the rest is inflated and thrown away."""
        d, out, data, off, size = zlib.decompressobj(31), bytearray(), b"", pos, 0
        while not d.eof:
            if not data:
                data = self.mm[off : off + _STEP]
                off += len(data)
                if not data:
                    return bytes(out), size, None
            try:
                piece = d.decompress(data, _STEP)
            except zlib.error:
                return bytes(out), size, None
            lo, hi = max(skip - size, 0), max(skip + n - size, 0)
            out += piece[lo:hi]
            size += len(piece)
            data = d.unconsumed_tail
        return bytes(out), size, off - len(d.unused_data)

    def next_start(self, pos: int) -> int | None:
        i = self.mm.find(GZIP_MAGIC, pos)
        while i >= 0:
            try:
                head = zlib.decompressobj(31).decompress(self.mm[i : i + 4096], 16)
            except zlib.error:
                head = b""
            if VERSION_LINE.match(head):
                return i
            i = self.mm.find(GZIP_MAGIC, i + 1)
        return None


class StreamLayout(Layout):
    """A WARC gzipped as a whole: positions are offsets in the decompressed stream."""

    name = "decompressed byte"

    def __init__(self, path: Path):
        super().__init__(path)
        self._stream = _CutTolerant(path)  # kept open: seeking forward from the last read is cheap

    def open(self, pos: int) -> BinaryIO:
        stream = _CutTolerant(self.path)
        stream.seek(pos)
        return stream

    def read(self, pos: int, skip: int, n: int) -> bytes:
        self._stream.seek(pos + skip)
        out = bytearray()
        while len(out) < n and (chunk := self._stream.read(min(n - len(out), _STEP))):
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self._stream.close()
        super().close()

    def size(self) -> int | None:
        return None  # the decompressed size is known only after inflating everything


class _CutTolerant(io.RawIOBase):
    """A gzip file read as a stream that simply ends where the file is cut or damaged, keeping every
    byte before that: `GzipFile.read(n)` drops what it had gathered when it meets the cut."""

    def __init__(self, path: Path):
        self._path = path
        self._gz = gzip.GzipFile(path, "rb")
        self._pos, self._dead = 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise io.UnsupportedOperation("only absolute seeks")
        if pos < self._pos or self._dead:  # backwards (or after a cut): start over
            self._gz.close()
            self._gz, self._pos, self._dead = gzip.GzipFile(self._path, "rb"), 0, False
        while self._pos < pos and self.read(min(pos - self._pos, _STEP)):
            pass
        return self._pos

    def readinto(self, buf) -> int:
        if self._dead:
            return 0
        try:
            data = self._gz.read1(len(buf))  # one raw read: nothing gathered is lost on an error
        except (EOFError, OSError, zlib.error):
            self._dead, data = True, b""
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._gz.close()
        super().close()


def open_layout(path: Path) -> Layout:
    """The layout of a WARC file, from its first bytes (not its name)."""
    with open(path, "rb") as fh:
        head = fh.read(len(GZIP_MAGIC))
    if head != GZIP_MAGIC:
        return Layout(path)
    return MemberLayout(path) if _one_record_per_member(path) else StreamLayout(path)


def _one_record_per_member(path: Path) -> bool:
    """Does the first gzip member end where its first record ends? (It does in every crawler's files.)"""
    head, _ = _inflate_first_member(path, MAX_HEADER)
    end = head.find(b"\r\n\r\n")
    length = _LENGTH.search(head, 0, end) if end >= 0 else None
    if length is None:
        return True  # no readable first record: member-wise resynchronisation is the best bet
    record_end = end + 4 + int(length.group(1)) + 4
    if record_end > 64 << 20:
        return True  # a huge first record: not worth inflating to find out
    data, ended = _inflate_first_member(path, record_end + 64)
    if not ended and len(data) < record_end:
        return True  # the first member is cut or damaged inside the first record: no telling
    return ended and not data[record_end:].strip(b"\r\n")


def _inflate_first_member(path: Path, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the file's first gzip member, and whether the member ended within them."""
    d, out = zlib.decompressobj(31), bytearray()
    with open(path, "rb") as fh:
        while len(out) < limit and not d.eof:
            data = d.unconsumed_tail or fh.read(512)  # small steps: an error loses only one step's output
            if not data:
                break
            try:
                out += d.decompress(data, limit - len(out))
            except zlib.error:
                break  # damaged further on: what decoded still tells the layout
    return bytes(out), d.eof
