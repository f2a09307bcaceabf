"""Record readers: JSON lines (`.jsonl`, `.json`, with `.gz`, `.zst` or `.bz2`), Parquet and a
`datasets` dataset saved with `save_to_disk`.

Each record becomes a document whose text is the first of `read.text_fields` it has (OSCAR puts
it in `content`), whose id is `<file stem>/<id field or record number>`, and whose meta keeps the
url, date and language when the record has them. Memory stays flat: JSON lines are read one line
at a time with a length cap (a 100 MB line is skipped in 1 MiB pieces and counted as
`record_too_large`), Parquet by row batches.

Per-record damage is a counted error with the file and line (`bad_utf8`, `bad_json`,
`not_an_object`, `missing_text`); a damaged stream (truncated `.gz`/`.bz2`/`.zst`, not compressed
at all) keeps the lines before the damage and counts one `truncated_input` / `corrupt_input`.
zstd gives no error when a file is cut short, so the reader drives the decompressor itself and
checks that the last frame ended.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.document import Counts, Document
from pipeline.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_META_KEYS = {
    "url": ("url",),
    "timestamp": ("date", "timestamp", "created"),
    "language": ("language", "lang"),
}


class _ZstdRaw(io.RawIOBase):
    """A raw stream over a zstd file that raises EOFError when the last frame is cut short."""

    def __init__(self, fh):
        import zstandard

        self.fh, self._zstd = fh, zstandard
        self.dec = zstandard.ZstdDecompressor().decompressobj()
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            chunk = self.fh.read(_CHUNK)
            if not chunk:
                if not self.dec.eof:
                    raise EOFError("zstd frame ends early (file truncated)")
                return 0
            self.buf = self._feed(chunk)
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = b""
        while chunk:
            if self.dec.eof:  # the next of several concatenated frames
                self.dec = self._zstd.ZstdDecompressor().decompressobj()
            try:
                out += self.dec.decompress(chunk)
            except self._zstd.ZstdError as exc:
                raise OSError(f"not zstd data: {exc}") from None
            chunk = self.dec.unused_data if self.dec.eof else b""
        return out

    def close(self) -> None:
        self.fh.close()
        super().close()


def open_bytes(path: Path):
    """A binary stream of the decompressed content, chosen by the last suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdRaw(open(path, "rb")), _CHUNK)  # noqa: SIM115 - closed with it
    return open(path, "rb")  # noqa: SIM115


class RecordReader:
    """Shared record -> Document logic and counters of the JSONL, Parquet and datasets readers."""

    name = "read"

    def __init__(self, path: str | Path, text_fields=("text", "content"), id_field: str | None = "id"):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"input file not found: {self.path}")
        from pipeline.data.readers import input_stem

        self.stem = input_stem(self.path)
        self.text_fields, self.id_field = tuple(text_fields), id_field
        self.site: dict = {}
        self.counts = Counts()

    def _to_document(self, rec: object, n: int) -> Document | str:
        """The record's document, or "error:<reason>" for a record that cannot be one."""
        if not isinstance(rec, dict):
            return "error:not_an_object"
        text = next((rec[f] for f in self.text_fields if f in rec), None)
        if not isinstance(text, str):
            return "error:missing_text"
        rid = rec.get(self.id_field) if self.id_field else None
        rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else n
        source = rec.get("source") if isinstance(rec.get("source"), str) else self.stem
        return Document(id=f"{self.stem}/{rid}", text=text, source=source, meta=_meta_of(rec))

    def _keep(self, out: Document | str, where: str) -> Document | None:
        if isinstance(out, Document):
            self.counts.kept += 1
            return out
        self._error(out.removeprefix("error:"), where)
        return None

    def _error(self, reason: str, where: str) -> None:
        self.counts.error(reason)
        log.warning("%s: %s at %s", self.path, reason, where)


def _meta_of(rec: dict) -> dict:
    """url / timestamp / language from the record or its `metadata` / `warc_headers` mapping."""
    pools = [rec, rec.get("metadata"), rec.get("warc_headers")]
    meta = {}
    for key, names in _META_KEYS.items():
        for pool in pools:
            if not isinstance(pool, dict):
                continue
            value = next((pool[n] for n in names if isinstance(pool.get(n), str)), None)
            value = value or (pool.get("warc-target-uri") if key == "url" else None)
            if isinstance(value, str) and value:
                meta[key] = value
                break
    return meta


class JsonlReader(RecordReader):
    """One JSON object per line; see the module docstring for what counts as an error."""

    def __init__(self, path, text_fields=("text", "content"), id_field="id", max_record_bytes=50_000_000):
        super().__init__(path, text_fields, id_field)
        self.max_bytes = max_record_bytes

    def __iter__(self) -> Iterator[Document]:
        if self.path.stat().st_size == 0:
            log.warning("%s: empty file, no documents", self.path)
            return
        lineno, offset = 0, 0
        with open_bytes(self.path) as fh:
            try:
                for lineno, line, offset in self._lines(fh):
                    doc = self._keep(self._parse(line, lineno), f"line {lineno} (byte {offset})")
                    if doc is not None:
                        yield doc
            except EOFError as exc:
                self._error("truncated_input", f"after line {lineno} (byte {offset}): {exc}")
            except (OSError, ValueError) as exc:  # BadGzipFile, bz2 "Invalid data stream", zstd errors
                self._error("corrupt_input", f"after line {lineno} (byte {offset}): {exc}")

    def _lines(self, fh) -> Iterator[tuple[int, bytes, int]]:
        """(line number, line, byte offset) of the non-blank lines; an over-long line is b"" + an error."""
        lineno, offset = 0, 0
        while line := fh.readline(self.max_bytes + 1):
            lineno += 1
            start, offset = offset, offset + len(line)
            if len(line) > self.max_bytes and not line.endswith(b"\n"):
                offset += _skip_line(fh)
                self._error(
                    "record_too_large", f"line {lineno} (byte {start}), more than {self.max_bytes} bytes"
                )
                continue
            if line.strip():
                yield lineno, line, start

    def _parse(self, line: bytes, n: int) -> Document | str:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return "error:bad_utf8"
        try:
            rec = json.loads(text)
        except ValueError:
            return "error:bad_json"
        return self._to_document(rec, n)


def _skip_line(fh) -> int:
    """Read past the rest of the current line in bounded pieces; returns the bytes skipped."""
    skipped = 0
    while piece := fh.readline(_CHUNK):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


class ParquetReader(RecordReader):
    """Row batches of a Parquet file (only the columns a document needs are read)."""

    def __iter__(self) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = 0
        try:
            pf = pq.ParquetFile(self.path)
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    n += 1
                    doc = self._keep(self._to_document(rec, n), f"row {n}")
                    if doc is not None:
                        yield doc
        except (OSError, pa.ArrowException) as exc:
            self._error("corrupt_input", f"after row {n}: {exc}")


class HfDiskReader(RecordReader):
    """A `datasets.Dataset` saved with `save_to_disk` (a folder), read in batches of 1024 rows."""

    def __iter__(self) -> Iterator[Document]:
        import datasets

        try:
            ds = datasets.load_from_disk(str(self.path))
        except (OSError, ValueError, FileNotFoundError) as exc:
            self._error("corrupt_input", f"load_from_disk: {exc}")
            return
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{self.path}: a DatasetDict ({list(ds)}); give one split's folder instead")
        n = 0
        for batch in ds.iter(batch_size=1024):
            for rec in _rows(batch):
                n += 1
                doc = self._keep(self._to_document(rec, n), f"row {n}")
                if doc is not None:
                    yield doc


def _rows(batch: dict[str, list]) -> Iterator[dict]:
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys)):
        yield dict(zip(keys, values))
