"""TokenizerConfig: which cleaned shards to sample, and how to train the SentencePiece model on them.

Loaded strictly by `pipeline.config.load_config(TokenizerConfig, path, overrides)`;
`configs/tokenizer/wiki_sample.yaml` is the worked example.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError

CHAT_ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
# Fixed pieces and ids of every tokenizer we train (token manifests record the ids for the trainer).
UNK, BOS, EOS, PAD = "<unk>", "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


@dataclass
class TokenizerConfig:
    name: str
    """Folder name under `output_root`; the tokenizer is written to `<output_root>/<name>/`."""
    inputs: list[str]
    """Cleaned shards (`*.jsonl.zst`): files, directories (all `*.jsonl.zst` inside) or glob patterns."""
    output_root: Path = Path("tokenizers")
    """Where tokenizer folders live."""
    vocab_size: int = 8000
    """Target vocabulary, special and byte pieces included. A corpus too small for it gives fewer pieces."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece algorithm. The Hugging Face copy gives the same ids as SentencePiece for bpe; for
    unigram it can differ in rare spots (see pipeline/tokenizer/hf.py), so prefer bpe."""
    max_shards: int = 0
    """Read at most this many of the input shards, chosen by a seeded hash of their file names
    (0: all). Bounds the reading on a huge corpus; the documents are then sampled from those."""
    sample_docs: int = 100_000
    """Train on at most this many documents, chosen by a seeded hash of their ids (not the first N)."""
    max_chars: int = 100_000_000
    """And on at most this many characters of those documents (SentencePiece holds them all in memory)."""
    character_coverage: float = 0.9995
    """Share of the sample's characters that get their own piece; rarer ones become UTF-8 byte pieces."""
    byte_fallback: bool = True
    """Spell characters that have no piece as UTF-8 bytes (`<0xE4>`...) instead of `<unk>`."""
    split_digits: bool = True
    """Every digit is its own piece (numbers tokenize uniformly)."""
    special_tokens: list[str] = field(default_factory=lambda: list(CHAT_ROLES))
    """Extra whole-piece tokens (chat roles), matched verbatim in text; ids 4, 5, ... after unk/bos/eos/pad."""
    seed: int = 0
    """Seed of the document sample. Same inputs and config give the same tokenizer.model bytes."""
    num_threads: int = 1
    """SentencePiece trainer threads."""

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(
                "name", f"must be a folder name (letters, digits, '.', '_', '-'), got {self.name!r}"
            )
        if not self.inputs:
            raise ConfigError("inputs", "must list at least one cleaned shard, folder or glob")
        if self.vocab_size < 300:
            raise ConfigError(
                "vocab_size",
                f"must be >= 300 (256 byte pieces + specials + characters), got {self.vocab_size}",
            )
        if self.vocab_size >= 2**31:
            raise ConfigError("vocab_size", f"must fit int32 token ids, got {self.vocab_size}")
        if self.max_shards < 0:
            raise ConfigError("max_shards", f"must be >= 0 (0: all shards), got {self.max_shards}")
        if self.sample_docs < 1 or self.max_chars < 1:
            raise ConfigError("sample_docs" if self.sample_docs < 1 else "max_chars", "must be >= 1")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError("character_coverage", f"must be in [0.9, 1.0], got {self.character_coverage}")
        self._validate_specials()
        if self.num_threads < 1:
            raise ConfigError("num_threads", f"must be >= 1, got {self.num_threads}")

    def _validate_specials(self) -> None:
        for i, tok in enumerate(self.special_tokens):
            if not tok or tok != tok.strip() or tok in self.special_tokens[:i]:
                raise ConfigError(
                    f"special_tokens[{i}]",
                    f"must be unique, non-empty, without spaces at the ends, got {tok!r}",
                )
            if tok in (UNK, BOS, EOS, PAD):
                raise ConfigError(f"special_tokens[{i}]", f"{tok!r} is already the unk/bos/eos/pad piece")
