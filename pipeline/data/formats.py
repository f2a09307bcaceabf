"""Input formats: the one registry of what reads a file and what turns its records into plain text.

`FORMATS` maps a format name (`DataConfig.format`) to a `Format`: the file-name suffixes that
select it when the config says "auto", how to open its reader (every reader takes a path, has
`.site`, `.counts` and iterates Documents), the extraction stages that turn the reader's text
into plain text (wikitext and HTML need one; JSONL, Parquet, datasets and WET are text already),
and, for formats that can split one file into several tasks, how. Adding a format is one entry
here plus its reader module; readers are imported only when a file of theirs is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.config import ReadConfig
from pipeline.data.stage import Stage
from pipeline.errors import DataError

ByteRange = tuple[int, int]


@dataclass(frozen=True)
class Format:
    """One input format: how to recognise, read, extract and (optionally) split its files."""

    name: str
    suffixes: tuple[str, ...]
    """Lower-case file-name endings that select this format under "auto"."""
    open: Callable[[Path, ReadConfig, ByteRange | None], object]
    """(path, read settings, byte range or None) -> reader."""
    extraction: Callable[[dict, ReadConfig], list[Stage]] = lambda site, read: []
    """(the reader's `site` info, read settings) -> stages that make plain text."""
    split: Callable[[Path, ReadConfig], list[ByteRange] | None] | None = None
    """(path, read settings) -> byte ranges read as separate tasks, or None for one task."""
    folder_markers: tuple[str, ...] = ()
    """A folder holding one of these files is of this format."""


def _wikipedia(path: Path, read: ReadConfig, byte_range: ByteRange | None):
    from pipeline.data.readers import WikipediaReader

    return WikipediaReader(path, skip_disambiguation=read.skip_disambiguation, byte_range=byte_range)


def _wikitext(site: dict, read: ReadConfig) -> list[Stage]:
    from pipeline.data.extract import WikitextExtractor

    return [WikitextExtractor(site)]


def _stream_ranges(path: Path, read: ReadConfig) -> list[ByteRange] | None:
    from pipeline.data.multistream import index_path, stream_ranges

    return stream_ranges(path, read.streams_per_task) if index_path(path) is not None else None


def _warc(path: Path, read: ReadConfig, byte_range: ByteRange | None, wet: bool = False):
    from pipeline.data.warc import WarcReader

    return WarcReader(path, max_record_bytes=read.max_record_bytes, wet=wet)


def _html(site: dict, read: ReadConfig) -> list[Stage]:
    from pipeline.data.warc import HtmlExtractor

    return [HtmlExtractor(read.html_extractor)]


def _jsonl(path: Path, read: ReadConfig, byte_range: ByteRange | None):
    from pipeline.data.jsonl import JsonlReader

    return JsonlReader(path, read.text_fields, read.id_field, read.max_record_bytes)


def _parquet(path: Path, read: ReadConfig, byte_range: ByteRange | None):
    from pipeline.data.jsonl import ParquetReader

    return ParquetReader(path, read.text_fields, read.id_field)


def _hf_disk(path: Path, read: ReadConfig, byte_range: ByteRange | None):
    from pipeline.data.jsonl import HfDiskReader

    return HfDiskReader(path, read.text_fields, read.id_field)


_JSON = tuple(j + c for j in (".jsonl", ".json", ".ndjson") for c in ("", ".gz", ".zst", ".bz2"))

FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("wikipedia", (".xml.bz2", ".xml.gz", ".xml"), _wikipedia, _wikitext, _stream_ranges),
        Format("warc", (".warc.gz", ".warc", ".warc.wat.gz"), _warc, _html),  # WAT: metadata only, all drops
        Format("wet", (".warc.wet.gz", ".wet.gz", ".warc.wet"), lambda p, r, b: _warc(p, r, b, wet=True)),
        Format("jsonl", _JSON, _jsonl),
        Format("parquet", (".parquet",), _parquet),
        Format("hf_disk", (), _hf_disk, folder_markers=("dataset_info.json", "state.json")),
    ]
}
"""Format name -> Format: the single place a new input format is added."""


def detect_format(path: str | Path) -> str:
    """The format of `path` from its name (or, for a folder, its marker files); DataError if unknown."""
    path = Path(path)
    if path.is_dir():
        for f in FORMATS.values():
            if any((path / marker).is_file() for marker in f.folder_markers):
                return f.name
        raise DataError(f"{path}: a folder that is not a dataset saved by datasets.save_to_disk")
    name = path.name.lower()
    by_suffix = sorted(
        ((s, f.name) for f in FORMATS.values() for s in f.suffixes), key=lambda sf: -len(sf[0])
    )
    for suffix, fmt in by_suffix:  # longest first: .warc.wet.gz before .warc.gz
        if name.endswith(suffix):
            return fmt
    raise DataError(
        f"{path}: cannot tell the format from the name; set format to one of {', '.join(FORMATS)}"
    )


def open_reader(path: Path, fmt: str, read: ReadConfig, byte_range: ByteRange | None = None):
    """The reader for one input (or one byte range of a splittable file); `fmt` is not "auto"."""
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if byte_range is not None and FORMATS[fmt].split is None:
        raise DataError(f"{path}: format {fmt} cannot read a byte range")
    return FORMATS[fmt].open(path, read, byte_range)


def extraction_stages(fmt: str, site: dict, read: ReadConfig) -> list[Stage]:
    """Stages that turn the reader's text into plain text: wikitext and HTML need one."""
    return FORMATS[fmt].extraction(site, read)
