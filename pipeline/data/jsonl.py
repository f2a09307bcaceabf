"""Record readers: JSON lines (`.jsonl`, `.json`, with `.gz`, `.zst` or `.bz2`), Parquet and a
`datasets` dataset saved with `save_to_disk`.

Each record becomes a document whose text is the first of `read.text_fields` it has (OSCAR puts
it in `content`), whose id is `<file stem>/<id field or record number>`, and whose meta keeps the
url, date and language when the record has them. Memory stays flat: JSON lines are read one line
at a time with a length cap (a 100 MB line is skipped in 1 MiB pieces and counted as
`record_too_large`), Parquet by row batches.

Per-record damage is a counted error with the file and line (`bad_utf8`, `bad_json`,
`not_an_object`, `missing_text`). A damaged stream (pipeline/data/streams.py) never ends the file
early: a corrupt gzip member (bz2 stream, zstd frame) is one `corrupt_input` error, the line the
damage cut through is dropped with it, and reading resumes at the next member; a truncated file
keeps every line before the cut and counts one `truncated_input`. Repairs are counted in
`counts.noted`: a UTF-8 byte-order mark before a line is stripped (`bom`), and a lone surrogate
in a JSON string (`"\ud800"`, which no UTF-8 writer accepts) becomes U+FFFD (`lone_surrogate`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.document import Counts, Document
from pipeline.data.streams import breaks_of, open_stream
from pipeline.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_META_KEYS = {
    "url": ("url",),
    "timestamp": ("date", "timestamp", "created"),
    "language": ("language", "lang"),
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def fix_surrogates(value, counts: Counts):
    """`value` (a string, or a list/dict holding strings) with lone surrogates as U+FFFD, counted."""
    if isinstance(value, str):
        if _SURROGATE.search(value) is None:
            return value
        fixed, n = _SURROGATE.subn("\ufffd", value)
        counts.note("lone_surrogate", n)
        return fixed
    if isinstance(value, list):
        return [fix_surrogates(v, counts) for v in value]
    if isinstance(value, dict):
        return {fix_surrogates(k, counts): fix_surrogates(v, counts) for k, v in value.items()}
    return value


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
        text, rid, source, meta = (
            fix_surrogates(v, self.counts) for v in (text, str(rid), source, _meta_of(rec))
        )
        return Document(id=f"{self.stem}/{rid}", text=text, source=source, meta=meta)

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
        lineno = offset = 0
        stream = open_stream(self.path)
        try:
            for lineno, line, offset in self._lines(stream):
                doc = self._keep(self._parse(line, lineno), f"line {lineno} (byte {offset})")
                if doc is not None:
                    yield doc
        except EOFError as exc:
            self._error("truncated_input", f"after line {lineno} (byte {offset}): {exc}")
        except OSError as exc:  # an unreadable plain file
            self._error("corrupt_input", f"after line {lineno} (byte {offset}): {exc}")
        finally:
            stream.close()

    def _lines(self, stream) -> Iterator[tuple[int, bytes, int]]:
        """(line number, line, decompressed byte offset) of the non-blank lines. An over-long line is
        skipped as `record_too_large`; the line a damaged span cut is dropped with it (_on_break)."""
        buf, lineno, offset, skipping, seen = b"", 0, 0, False, 0
        while chunk := stream.read(_CHUNK):
            if len(breaks_of(stream)) > seen:  # this chunk starts after a damaged span
                seen = self._on_break(breaks_of(stream), seen, lineno, offset + len(buf))
                offset, buf, skipping = offset + len(buf), b"", False
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                lineno += 1
                start, offset = offset, offset + len(line) + 1
                if skipping:
                    skipping = False  # the end of an over-long line
                elif len(line) > self.max_bytes:
                    self._error(
                        "record_too_large", f"line {lineno} (byte {start}), more than {self.max_bytes} bytes"
                    )
                elif line.strip():
                    yield lineno, line, start
            if len(buf) > self.max_bytes:
                if not skipping:
                    where = f"line {lineno + 1} (byte {offset}), more than {self.max_bytes} bytes"
                    self._error("record_too_large", where)
                offset, buf, skipping = offset + len(buf), b"", True
        if len(breaks_of(stream)) > seen:
            self._on_break(breaks_of(stream), seen, lineno, offset + len(buf))
        elif buf.strip() and not skipping:
            yield lineno + 1, buf, offset

    def _on_break(self, breaks: list, seen: int, lineno: int, offset: int) -> int:
        """Count and log the damaged spans not yet seen; returns how many have been seen."""
        for where, why in breaks[seen:]:
            self._error(
                "corrupt_input",
                f"compressed byte {where}, after line {lineno} (decompressed byte {offset}): {why}; "
                "skipped to the next intact member, losing the line it cut",
            )
        return len(breaks)

    def _parse(self, line: bytes, n: int) -> Document | str:
        if line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one)
            line = line[3:]
            self.counts.note("bom")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return "error:bad_utf8"
        try:
            rec = json.loads(text)
        except ValueError:
            return "error:bad_json"
        return self._to_document(rec, n)


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
