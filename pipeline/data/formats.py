"""Input formats: which reader and which extraction stage each input file gets.

`detect_format` maps a file name to a format when the config says "auto"; `open_reader` builds the
reader (every reader takes a path, has `.site`, `.counts` and iterates Documents) and
`extraction_stages` the stages that turn the reader's raw text into plain text (wikitext and
HTML need one; JSONL, Parquet, datasets and WET are text already).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.config import ReadConfig
from pipeline.data.stage import Stage
from pipeline.errors import DataError

_SUFFIXES = [  # longest first: the first match wins
    (".warc.wet.gz", "wet"),
    (".wet.gz", "wet"),
    (".warc.wet", "wet"),
    (".warc.wat.gz", "warc"),  # metadata only: every record is counted as a drop, no documents
    (".warc.gz", "warc"),
    (".warc", "warc"),
    (".xml.bz2", "wikipedia"),
    (".xml.gz", "wikipedia"),
    (".xml", "wikipedia"),
    (".parquet", "parquet"),
]
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSION = ("", ".gz", ".zst", ".bz2")


def detect_format(path: str | Path) -> str:
    """The format of `path` from its name (or, for a folder, a `datasets` save); DataError if unknown."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf_disk"
        raise DataError(f"{path}: a folder that is not a dataset saved by datasets.save_to_disk")
    name = path.name.lower()
    for suffix, fmt in _SUFFIXES:
        if name.endswith(suffix):
            return fmt
    if any(name.endswith(j + c) for j in _JSON_SUFFIXES for c in _COMPRESSION):
        return "jsonl"
    raise DataError(
        f"{path}: cannot tell the format from the name; set format to one of "
        "wikipedia, jsonl, parquet, hf_disk, warc, wet"
    )


def open_reader(path: Path, fmt: str, read: ReadConfig, byte_range: tuple[int, int] | None = None):
    """The reader for one input (or one byte range of a multistream dump); `fmt` is not "auto"."""
    if fmt == "wikipedia":
        from pipeline.data.readers import WikipediaReader

        return WikipediaReader(path, skip_disambiguation=read.skip_disambiguation, byte_range=byte_range)
    if fmt in ("warc", "wet"):
        from pipeline.data.warc import WarcReader

        return WarcReader(path, max_record_bytes=read.max_record_bytes, wet=fmt == "wet")
    from pipeline.data.jsonl import HfDiskReader, JsonlReader, ParquetReader

    if fmt == "jsonl":
        return JsonlReader(path, read.text_fields, read.id_field, read.max_record_bytes)
    if fmt == "parquet":
        return ParquetReader(path, read.text_fields, read.id_field)
    if fmt == "hf_disk":
        return HfDiskReader(path, read.text_fields, read.id_field)
    raise DataError(f"{path}: unknown format {fmt!r}")


def extraction_stages(fmt: str, site: dict, read: ReadConfig) -> list[Stage]:
    """Stages that turn the reader's text into plain text: wikitext and HTML need one."""
    if fmt == "wikipedia":
        from pipeline.data.extract import WikitextExtractor

        return [WikitextExtractor(site)]
    if fmt == "warc":
        from pipeline.data.warc import HtmlExtractor

        return [HtmlExtractor(read.html_extractor)]
    return []
