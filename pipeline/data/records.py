"""Small user-given record files: evaluation sets (decontamination) and classifier training data.

`iter_records` reads JSON lines (`.jsonl`/`.json`/`.ndjson`, optionally `.gz`, `.zst`, `.bz2`), a
JSON array (`[...]`, as Alpaca-style files ship) and Parquet. `field_texts` pulls the strings a
config names out of one record; a dotted name walks into objects and lists
(`instances.output` gives every instance's output), and a list of strings gives each string.
A record that cannot be read is yielded as an error string with its file and line, so the
caller decides: decontamination refuses a damaged evaluation set (it would silently weaken the
check), classifier training counts and logs the skip.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DataError

_JSON = (".jsonl", ".json", ".ndjson")
_COMPRESSED = ("", ".gz", ".zst", ".bz2")


def record_format(path: Path) -> str:
    """ "json" or "parquet" from the file name; DataError naming the file otherwise."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if any(name.endswith(j + c) for j in _JSON for c in _COMPRESSED):
        return "json"
    raise DataError(f"{path}: expected .jsonl/.json (optionally .gz/.zst/.bz2) or .parquet")


def iter_records(path: str | Path) -> Iterator[dict | str]:
    """Each record of `path` as a dict, or an error string "<file>:<line>: <reason>" for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if record_format(path) == "parquet":
        yield from _parquet_records(path)
    else:
        yield from _json_records(path)


def _json_records(path: Path) -> Iterator[dict | str]:
    """JSON lines, streamed; or one JSON array when the first non-blank line starts with `[`."""
    from pipeline.data.streams import breaks_of, open_stream  # the readers' decompression

    lineno = 0
    try:
        with open_stream(path) as raw, io.BufferedReader(raw) as fh:
            for lineno, line_bytes in enumerate(fh, start=1):
                line = line_bytes.decode("utf-8", errors="replace")
                if breaks_of(raw):  # a damaged member was skipped: refuse the file (it is small)
                    offset, why = breaks_of(raw)[0]
                    raise DataError(
                        f"{path}: damaged at compressed byte {offset} ({why}), near line {lineno}"
                    )
                if not line.strip():
                    continue
                if line.lstrip().startswith("["):
                    yield from _json_array(path, line + fh.read().decode("utf-8", errors="replace"))
                    return
                yield _json_line(path, lineno, line)
    except (EOFError, OSError) as exc:
        raise DataError(f"{path}: damaged or truncated after line {lineno}: {exc}") from None


def _json_line(path: Path, lineno: int, line: str) -> dict | str:
    try:
        row = json.loads(line)
    except ValueError:
        return f"{path}:{lineno}: not valid JSON"
    return row if isinstance(row, dict) else f"{path}:{lineno}: not an object"


def _json_array(path: Path, text: str) -> Iterator[dict | str]:
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not a valid JSON array: {exc}") from None
    for i, row in enumerate(rows, start=1):
        yield row if isinstance(row, dict) else f"{path}:item {i}: not an object"


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: damaged Parquet file: {exc}") from None


def field_texts(record: dict, fields: list[str]) -> list[str]:
    """The non-empty strings under each of `fields` (dotted names walk into objects and lists)."""
    out: list[str] = []
    for name in fields:
        _collect(record, name.split("."), out)
    return out


def _collect(value: object, path: list[str], out: list[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _collect(item, path, out)
    elif path:
        if isinstance(value, dict) and path[0] in value:
            _collect(value[path[0]], path[1:], out)
    elif isinstance(value, str) and value.strip():
        out.append(value)
