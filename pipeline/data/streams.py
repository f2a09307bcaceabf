"""Decompressed input streams that survive damage: gzip members, bz2 streams, zstd frames.

`open_stream(path)` gives a raw binary stream of a file's content, decompressed by its suffix
(`.gz`, `.bz2`, `.zst`; anything else is read as is). Compressed files may hold many members
(gzip), streams (bz2) or frames (zstd) one after another, as Common Crawl and multistream dumps
do. Two kinds of damage are handled here so that no good byte is lost:

- A member that fails to decompress (a flipped byte, garbage between members, a file that is
  not compressed at all) is skipped: the stream records a *break* (compressed offset and the
  decompressor's message in `breaks`) and resumes at the next member's magic bytes after the
  damaged member's start. Bytes before the break are delivered first, and no single `read`
  returns bytes from both sides of a break, so a reader that checks `len(stream.breaks)` after
  each read knows where the text was cut and can drop the record the cut went through.
- A file that ends inside a member (truncated) delivers every byte the decompressor could
  recover, and only then raises EOFError (the standard library's readers raise it with the last
  decoded block still unread).
"""

from __future__ import annotations

import bz2
import io
import re
import zlib
from pathlib import Path

_CHUNK = 1 << 16  # compressed bytes per decompress call: a damaged member loses at most this much output
# Where a member can start: gzip (deflate) header, bz2 stream header + first block magic, zstd frame.
_MAGIC = {
    ".gz": re.compile(rb"\x1f\x8b\x08"),
    ".bz2": re.compile(rb"BZh[1-9]1AY&SY"),
    ".zst": re.compile(rb"\x28\xb5\x2f\xfd"),
}


def _decompressor(kind: str):
    if kind == ".gz":
        return zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer (CRC and size are checked)
    if kind == ".bz2":
        return bz2.BZ2Decompressor()
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _errors(kind: str) -> tuple[type[BaseException], ...]:
    if kind == ".zst":
        import zstandard

        return (zstandard.ZstdError, ValueError)
    return (zlib.error, OSError, ValueError, EOFError)


class DecompressedStream(io.RawIOBase):
    """Raw stream of a compressed file's content; see the module docstring for damage handling."""

    def __init__(self, path: Path, kind: str):
        self.fh, self.kind = open(path, "rb"), kind  # noqa: SIM115 - closed by close()
        self.errors = _errors(kind)
        self.breaks: list[tuple[int, str]] = []
        """(compressed byte offset of the damaged member, why it failed) per damaged span skipped."""
        self._dec = _decompressor(kind)
        self._pending = b""  # compressed bytes read, not yet fed
        self._pos = 0  # compressed offset of _pending[0]
        self._member = 0  # compressed offset where the current member starts
        self._fed = False  # the current member has been fed at least one byte
        self._buf = b""  # decompressed bytes not yet delivered (all from one side of a break)
        self._out_since_break = True  # False between a break and the next decompressed byte

    def readable(self) -> bool:
        return True

    def tell_compressed(self) -> int:
        """Compressed offset up to which the file has been consumed (for log lines)."""
        return self._pos

    def readinto(self, b) -> int:
        while not self._buf:
            if not self._fill():
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def _fill(self) -> bool:
        """Decompress some more into `_buf`; False at the clean end of the file."""
        if not self._pending:
            self._pending = self.fh.read(_CHUNK)
            if not self._pending:
                if self._fed and not self._dec.eof:
                    raise EOFError(f"compressed stream ends early (member at compressed byte {self._member})")
                return False
        if not self._fed and not self._pending.strip(b"\x00"):
            self._pos += len(self._pending)  # zero padding after the last member, as some writers add
            self._pending = b""
            return True
        data, self._pending = self._pending, b""
        try:
            out = self._dec.decompress(data)
        except self.errors as exc:
            self._resync(f"{type(exc).__name__}: {exc}")
            return True
        self._fed = True
        self._out_since_break = self._out_since_break or bool(out)
        if self._dec.eof:  # the member ended: the rest starts the next one
            rest = self._dec.unused_data
            self._pos += len(data) - len(rest)
            self._pending, self._member, self._fed = rest, self._pos, False
            self._dec = _decompressor(self.kind)
        else:
            self._pos += len(data)
        self._buf = out
        return True

    def _resync(self, why: str) -> None:
        """Skip the damaged member: continue at the next member magic after its start (or at the end).
        A false start (magic bytes inside the damage) extends the same break instead of adding one."""
        if self._out_since_break or not self.breaks:
            self.breaks.append((self._member, why))
        self._out_since_break = False
        self.fh.seek(self._member + 1)
        pos, carry = self._member + 1, b""
        while chunk := self.fh.read(_CHUNK):
            window = carry + chunk
            m = _MAGIC[self.kind].search(window)
            if m is not None:
                start = pos - len(carry) + m.start()
                self.fh.seek(start)
                self._pos = self._member = start
                break
            carry = window[-16:]  # a magic split across two reads
            pos += len(chunk)
        else:
            self._pos = self._member = pos
        self._pending, self._fed, self._dec = b"", False, _decompressor(self.kind)

    def close(self) -> None:
        self.fh.close()
        super().close()


def open_stream(path: Path):
    """A raw binary stream of the decompressed content, chosen by the last suffix; plain files as is."""
    suffix = path.suffix.lower()
    if suffix in _MAGIC:
        return DecompressedStream(path, suffix)
    return open(path, "rb")  # noqa: SIM115 - closed by the caller


def breaks_of(stream) -> list[tuple[int, str]]:
    """The damaged spans a stream skipped so far ([] for streams that cannot skip)."""
    return getattr(stream, "breaks", [])
