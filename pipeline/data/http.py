"""HTTP responses inside WARC `response` records: status, headers, and the body as the server meant it.

Most crawlers store the response as it came over the wire, so the body may still carry its transfer
coding (`chunked`) and content codings (`gzip`, `deflate`, `br`, `zstd`, stacked as listed). Common
Crawl stores bodies already decoded (it renames the headers); the Internet Archive's writer stores
them de-chunked under a `Transfer-Encoding: chunked` header, and browser-based recorders store them
fully decoded under the original headers. So every step checks the bytes, not only the header:
- chunked framing is validated; a body that does not start with a valid chunk is read as is;
- a body that already looks like text (no control bytes) is taken as is whatever the codings say,
  since compressed data never does;
- a stream cut short (the crawler's size limit, `WARC-Truncated`) keeps what decoded and is marked
  incomplete; only a body of which nothing decodes is an error (`HttpError`, with a counter reason).
This module reads bytes only: no backend, no I/O, so a test can call it on literals.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

_STATUS = re.compile(rb"HTTP/\d+(?:\.\d+)?[ \t]+(\d{3})\b")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
MAX_HEADER_BYTES = 65536
STEP = 65536  # compressed bytes fed per call: a corrupt spot later on keeps what decoded before it
_IDENTITY = {"", "identity", "none"}
# bytes that text never holds (C0 controls other than tab, LF, FF, CR, and ESC for ISO-2022) but
# compressed data is full of (about 1 byte in 10)
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))
_TEXT_BYTES = bytes(b for b in range(256) if b not in _CONTROL)


class HttpError(Exception):
    """A response whose headers or body cannot be read; `reason` is its counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class _Undecodable(Exception):
    """Nothing of the body decodes with this coding."""


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    """Lower-case header name -> its values in order (a repeated header keeps every value)."""
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The last value of a header, or None."""
        values = self.headers.get(name)
        return values[-1] if values else None

    def tokens(self, name: str) -> list[str]:
        """A list-valued header (`gzip, br`) over all its lines, lower case, in order."""
        return [t.strip().lower() for v in self.headers.get(name, []) for t in v.split(",") if t.strip()]

    def content_type(self) -> tuple[str, str | None]:
        """(media type without parameters, lower case; charset parameter or None); ("", None) if absent."""
        parts = (self.header("content-type") or "").split(";")
        params = (p.strip().split("=", 1) for p in parts[1:] if "=" in p)
        charset = next((v.strip("\"' \t") for k, v in params if k.strip().lower() == "charset"), None)
        return parts[0].strip().lower(), charset or None


def parse_response(block: bytes) -> HttpResponse | None:
    """The HTTP response in a record block; None when the block is not HTTP (a `dns:` record)."""
    if not block.startswith(b"HTTP/"):
        return None
    ends = [
        (i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := block.find(sep, 0, MAX_HEADER_BYTES)) >= 0
    ]
    if not ends:
        raise HttpError("http_bad_header", "no end of the HTTP headers")
    end, sep = min(ends)
    # bytes.split, not str.splitlines: a latin-1 decoded 0x85 byte (in UTF-8 "Å") is no line break
    lines = [line.rstrip(b"\r").decode("latin-1") for line in block[:end].split(b"\n")]
    status = _STATUS.match(block)
    if status is None:
        raise HttpError("http_bad_header", f"bad status line {lines[0][:80]!r}")
    resp = HttpResponse(int(status.group(1)), body=block[end + sep :])
    last = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and last is not None:  # obsolete line folding
            resp.headers[last][-1] += " " + line.strip()
        elif ":" in line:
            name, value = line.split(":", 1)
            last = name.strip().lower()
            resp.headers.setdefault(last, []).append(value.strip())
    return resp


def looks_like_text(data: bytes) -> bool:
    """True when the first KiB holds (almost) no control bytes: plain text or markup, not compressed."""
    sample = data[:1024]
    return len(sample.translate(None, _TEXT_BYTES)) <= len(sample) // 100


def decode_body(resp: HttpResponse, limit: int) -> tuple[bytes, bool]:
    """(body with transfer and content codings undone, complete?); HttpError when nothing decodes."""
    transfer = resp.tokens("transfer-encoding")
    data, complete = resp.body, True
    if "chunked" in transfer:
        data, complete = dechunk(data)
    # codings were applied content first, then transfer, each in the order listed: undo from the end
    for coding in reversed(resp.tokens("content-encoding") + [t for t in transfer if t != "chunked"]):
        if coding in _IDENTITY or looks_like_text(data):
            continue  # already decoded by the writer (or never encoded), whatever the header says
        data, done = _undo(coding, data, limit)
        complete = complete and done
    if len(data) > limit:
        raise HttpError("http_body_too_large", f"body of {len(data):,} bytes > {limit:,}")
    return data, complete


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """(data, complete) of a chunked body; a body that does not start with a valid chunk is returned
    as is (complete), and one whose framing breaks later keeps the chunks before the break."""
    parts, pos = [], 0
    while True:
        m = _CHUNK_SIZE.match(body, pos)
        if m is None:
            if pos == 0:
                return body, True  # not chunked after all (stored de-chunked under the header)
            return b"".join(parts), pos >= len(body)  # no last-chunk at the very end is tolerated
        size, start = int(m.group(1), 16), m.end()
        if size == 0:
            return b"".join(parts), True
        end = start + size
        parts.append(body[start:end])
        if end >= len(body):
            return b"".join(parts), False  # cut inside a chunk: the crawler's size limit
        crlf = 2 if body.startswith(b"\r\n", end) else 1 if body.startswith(b"\n", end) else 0
        if not crlf:
            if pos == 0:
                return body, True  # the "size line" was text that happens to be hex
            return b"".join(parts), False
        pos = end + crlf


def _undo(coding: str, data: bytes, limit: int) -> tuple[bytes, bool]:
    decoder = _DECODERS.get(coding)
    if decoder is None:
        raise HttpError("http_unknown_encoding", f"content coding {coding[:40]!r} is not supported")
    try:
        return decoder(data, limit)
    except _Undecodable as exc:
        name = "gzip" if coding == "x-gzip" else coding
        raise HttpError(f"http_bad_{name}", f"{coding} body does not decode: {exc}") from None


def _too_large(n: int, limit: int) -> None:
    if n > limit:
        raise HttpError("http_body_too_large", f"body decodes to more than {limit:,} bytes")


def _zlib(data: bytes, limit: int, wbits: int) -> tuple[bytes, bool, bytes]:
    """(output, reached the end of the stream, bytes after it) for one zlib/gzip/raw deflate stream."""
    d, out = zlib.decompressobj(wbits), bytearray()
    for pos in range(0, len(data), STEP):
        try:
            out += d.decompress(data[pos : pos + STEP], limit + 1 - len(out))
        except zlib.error as exc:
            if not out:
                raise _Undecodable(str(exc)) from None
            return bytes(out), False, b""
        _too_large(len(out), limit)
        if d.eof:
            return bytes(out), True, d.unused_data + data[pos + STEP :]
    return bytes(out), d.eof, b""


def _gunzip(data: bytes, limit: int) -> tuple[bytes, bool]:
    out, done, rest = _zlib(data, limit, 31)
    while done and rest.startswith(b"\x1f\x8b"):  # a body of several gzip members
        more, done, rest = _zlib(rest, limit - len(out), 31)
        out += more
    return out, done


def _inflate(data: bytes, limit: int) -> tuple[bytes, bool]:
    """`deflate` is meant to be zlib-wrapped (RFC 9110) but many servers send raw deflate (or gzip)."""
    try:
        out, done, _ = _zlib(data, limit, 47)  # 32 + 15: zlib or gzip header, detected
    except _Undecodable:
        out, done, _ = _zlib(data, limit, -15)
    return out, done


def _unbrotli(data: bytes, limit: int) -> tuple[bytes, bool]:
    import brotli

    d, out = brotli.Decompressor(), bytearray()
    for pos in range(0, len(data), STEP):
        try:
            out += d.process(data[pos : pos + STEP], output_buffer_limit=limit + 1 - len(out))
        except brotli.error as exc:
            if not out:
                raise _Undecodable(str(exc)) from None
            return bytes(out), False
        _too_large(len(out), limit)
    return bytes(out), d.is_finished()


def _unzstd(data: bytes, limit: int) -> tuple[bytes, bool]:
    import zstandard

    d, out = zstandard.ZstdDecompressor().decompressobj(), bytearray()
    for pos in range(0, len(data), 1024):  # no output bound per call: small steps bound a zstd bomb
        try:
            out += d.decompress(data[pos : pos + 1024])
        except zstandard.ZstdError as exc:
            if not out:
                raise _Undecodable(str(exc)) from None
            return bytes(out), False
        _too_large(len(out), limit)
        if d.eof:
            break
    return bytes(out), d.eof


_DECODERS = {"gzip": _gunzip, "x-gzip": _gunzip, "deflate": _inflate, "br": _unbrotli, "zstd": _unzstd}
