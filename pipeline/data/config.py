"""DataConfig: what the data-prep job reads, how it cleans and tokenizes, and where it writes.

One section per concern, loaded strictly by `pipeline.config.load_config(DataConfig, path, overrides)`.
Defaults run on a laptop; `configs/data/wiki_sample.yaml` is the worked example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError


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
class CleanConfig:
    min_chars: int = 200
    """Documents shorter than this many characters after cleaning are dropped as `too_short`."""

    def validate(self) -> None:
        if self.min_chars < 0:
            raise ConfigError("min_chars", f"must be >= 0, got {self.min_chars}")


@dataclass
class TokenizeConfig:
    tokenizer: Path | None = None
    """A `tokenizers/<name>` folder (SentencePiece model + Hugging Face files); required for "tokenize"."""
    valid_fraction: float = 0.01
    """Share of documents sent to the valid split, chosen by a hash of the document id (stable)."""
    batch_size: int = 512
    """Documents per encode call (memory vs. speed; the output does not depend on it)."""

    def validate(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class DataConfig:
    inputs: list[str]
    """Input files or glob patterns (relative to the working directory); each file becomes one shard."""
    output_dir: Path
    """Where `config.yaml`, `cleaned/`, `tokens/` and `report.json` are written."""
    name: str = "data"
    """A label for logs and the report."""
    format: Literal["wikipedia"] = "wikipedia"
    """Input format: MediaWiki XML dumps (`.xml`, `.xml.bz2` or `.xml.gz`)."""
    steps: list[Literal["clean", "tokenize"]] = field(default_factory=lambda: ["clean", "tokenize"])
    """Which steps to run, in this order; "tokenize" reads the shards "clean" wrote."""
    max_error_fraction: float = 0.01
    """A shard whose unreadable records exceed this share of its records fails with a DataError."""
    ray: RayConfig = field(default_factory=RayConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs", "must list at least one file or glob")
        if not self.steps:
            raise ConfigError("steps", "must name at least one of ['clean', 'tokenize']")
        if list(self.steps) != [s for s in ("clean", "tokenize") if s in self.steps]:
            raise ConfigError(
                "steps", f"must be ['clean'], ['tokenize'] or ['clean', 'tokenize'], got {self.steps}"
            )
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError("max_error_fraction", f"must be in [0, 1], got {self.max_error_fraction}")
        if "tokenize" in self.steps and self.tokenize.tokenizer is None:
            raise ConfigError(
                "tokenize.tokenizer", f"is required when steps include 'tokenize'; {TRAIN_HINT}"
            )


TRAIN_HINT = "train one with python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml"
