"""Train a SentencePiece tokenizer on a deterministic sample of cleaned shards.

The sample is the `sample_docs` documents whose seeded hash of the id is smallest, so it is a
pure function of (documents, seed): independent of file order and of how the shards are split.
The model is lossless and needs no normalizer, so its Hugging Face copy gives the same ids:
identity normalization (cleaning already applied NFC), no dummy prefix, whitespace kept as is,
byte fallback for characters without a piece. The folder `<output_root>/<name>/` appears
atomically with `tokenizer.model`, the Hugging Face files (see hf.py) and `training.json`.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import to_dict
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_dir, read_jsonl_zst, write_json
from pipeline.tokenizer.config import BOS, EOS, PAD, SPECIAL_IDS, UNK, TokenizerConfig

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 16  # SentencePiece skips longer training lines (its default is 4192)


@dataclass
class Sample:
    """The training sample: lines of text (one SentencePiece "sentence" each) and what was read."""

    lines: list[str] = field(default_factory=list)
    documents: int = 0
    chars: int = 0
    seen: int = 0
    bad: Counter = field(default_factory=Counter)


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their `*.jsonl.zst`) and globs into a sorted, de-duplicated file list."""
    found: set[Path] = set()
    for i, item in enumerate(inputs):
        p = Path(item)
        if p.is_dir():
            matches = list(p.glob("*.jsonl.zst"))
        elif p.is_file():
            matches = [p]
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file()]
        if not matches:
            raise ConfigError(f"inputs[{i}]", f"{item!r} matches no cleaned shard (*.jsonl.zst)")
        found.update(matches)
    return sorted(found)


def choose_shards(paths: list[Path], cfg: TokenizerConfig) -> list[Path]:
    """The `cfg.max_shards` shards with the smallest seeded hash of their file name (all when 0), sorted."""
    if not cfg.max_shards or len(paths) <= cfg.max_shards:
        return paths
    return sorted(sorted(paths, key=lambda p: sample_key(cfg.seed, p.name))[: cfg.max_shards])


def sample_key(seed: int, doc_id: str) -> bytes:
    """Seeded, stable sort key of a document: the sample keeps the smallest keys."""
    return hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=16).digest()


def _iter_texts(paths: list[Path], bad: Counter):
    """Yield (doc id, text) from every shard; records without a string text are counted in `bad`."""
    from pipeline.data.tokenize import check_complete

    for path in paths:
        check_complete(path)  # a truncated .zst would read as fewer documents, silently
        for line_no, row in enumerate(read_jsonl_zst(path), start=1):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text:
                bad["no_text"] += 1
                log.warning("%s:%d: record has no text, skipped", path, line_no)
                continue
            doc_id = row.get("id")
            yield (doc_id if isinstance(doc_id, str) else f"{path.name}:{line_no}"), text


def sample_documents(paths: list[Path], cfg: TokenizerConfig) -> Sample:
    """Pick `cfg.sample_docs` documents by seeded hash, then keep them (in key order) up to `cfg.max_chars`."""
    sample = Sample()
    heap: list[tuple[bytes, str]] = []  # max-heap on the key, via negated bytes
    for doc_id, text in _iter_texts(paths, sample.bad):
        sample.seen += 1
        neg = bytes(255 - b for b in sample_key(cfg.seed, doc_id))
        if len(heap) < cfg.sample_docs:
            heapq.heappush(heap, (neg, text))
        elif neg > heap[0][0]:
            heapq.heapreplace(heap, (neg, text))
    for _, text in sorted(heap, reverse=True):  # smallest key first
        if sample.chars + len(text) > cfg.max_chars and sample.documents:
            break
        sample.documents += 1
        sample.chars += len(text)
        # SentencePiece trains on lines, so "\n" gets no piece: it is spelled as the byte piece <0x0A>
        sample.lines.extend(line for line in text.split("\n") if line.strip())
    if not sample.lines:
        raise DataError(
            f"no text to train on in {len(paths)} shard(s) ({sample.seen} documents read): {paths[:3]}"
        )
    return sample


def trainer_options(cfg: TokenizerConfig) -> dict:
    """SentencePieceTrainer.train keyword arguments (besides the sentence iterator and model writer)."""
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hard_vocab_limit=False,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        split_digits=cfg.split_digits,
        user_defined_symbols=list(cfg.special_tokens),
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        **SPECIAL_IDS,
        # lossless and normalizer-free, so Hugging Face's tokenizer reproduces it exactly (see hf.py)
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        # we sampled already: use every line, in order, so training is deterministic
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=MAX_LINE_BYTES,
        num_threads=cfg.num_threads,
        minloglevel=2,  # SentencePiece's own stderr logging: errors only
    )


def train_model(lines: list[str], cfg: TokenizerConfig) -> bytes:
    """Run SentencePiece on `lines`; returns the serialized model.

    Lines go in through an iterator and the model comes back in memory, so no temp path ends up
    in the model's trainer_spec: same sample + config give the same bytes (and fingerprint).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, **trainer_options(cfg)
        )
    except RuntimeError as exc:  # e.g. vocab_size too small for the characters to cover
        raise ConfigError("vocab_size", f"SentencePiece could not train: {exc}") from None
    return model.getvalue()


def train_tokenizer(cfg: TokenizerConfig) -> Path:
    """Sample, train and write `<output_root>/<name>/` (atomically); returns that folder."""
    from pipeline.tokenizer import hf

    paths = choose_shards(resolve_inputs(cfg.inputs), cfg)
    sample = sample_documents(paths, cfg)
    log.info(
        "tokenizer %s: sampled %d of %d documents (%d chars, %d lines) from %d shards; bad records %s",
        cfg.name,
        sample.documents,
        sample.seen,
        sample.chars,
        len(sample.lines),
        len(paths),
        dict(sample.bad),
    )
    out = Path(cfg.output_root) / cfg.name
    model = train_model(sample.lines, cfg)
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer.model").write_bytes(model)
        vocab = hf.write_hf_files(tmp, special_tokens=cfg.special_tokens)
        write_json(
            tmp / "training.json",
            {
                "config": to_dict(cfg),
                "vocab_size": vocab,
                "fingerprint": hf.fingerprint(tmp),
                "sample": {
                    "documents": sample.documents,
                    "documents_read": sample.seen,
                    "chars": sample.chars,
                    "lines": len(sample.lines),
                    "bad_records": dict(sample.bad),
                },
                "inputs": [{"name": p.name, "bytes": p.stat().st_size} for p in paths],
            },
        )
    log.info("tokenizer %s: %d pieces written to %s", cfg.name, vocab, out)
    return out
