"""The tokenizer half of a GGUF file: our SentencePiece vocabulary under llama.cpp's `tokenizer.*` keys.

llama.cpp's "llama" vocabulary type is SentencePiece's: a piece list with scores and piece types
(normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6: the numbering of
sentencepiece_model.proto, which GGUF keeps), spaces escaped as "▁", and BPE merges chosen by
the best-scored merged piece. Our models (pipeline/tokenizer/train.py) add no dummy prefix, so
`add_space_prefix` is false. llama.cpp adds BOS itself when `add_bos_token` is true (our training
data starts every document with BOS); its chat code strips a template's leading BOS in that case,
so the chat template is written unchanged. For bpe models the merges are written too (llama.cpp
ignores them for this type; transformers' GGUF loader uses them instead of re-deriving them).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import DataError
from pipeline.tokenizer.hf import CONTROL, MODEL_FILE, NORMAL, UNUSED, bpe_merges, read_proto

log = logging.getLogger(__name__)

BPE, UNIGRAM = 2, 1  # trainer_spec.model_type


def vocab_entries(folder: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, types) of `folder/tokenizer.model`, padded with unused `[PAD<i>]` rows
    up to the model's embedding rows (llama.cpp requires one token per row)."""
    proto = read_proto(Path(folder) / MODEL_FILE)
    pieces = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    if len(pieces) > vocab_size:
        raise DataError(
            f"{folder / MODEL_FILE}: {len(pieces)} pieces but the model has only {vocab_size} embedding rows"
        )
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]")
        scores.append(0.0)
        types.append(UNUSED)
    return pieces, scores, types


def write_vocab(writer, folder: Path, vocab_size: int, chat_template: str | None) -> dict[str, int]:
    """Add the tokenizer keys to a GGUFWriter; returns the special token ids written."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise DataError(
            f"{folder}: no {MODEL_FILE}; GGUF export needs the SentencePiece model our tokenizers ship"
        )
    proto = read_proto(folder / MODEL_FILE)
    spec = proto.trainer_spec
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.name not in ("identity", ""):
        log.warning(
            "%s: normalizer %s (dummy prefix %s) is not reproduced by llama.cpp's tokenizer; "
            "expect different token ids on some texts",
            folder / MODEL_FILE,
            proto.normalizer_spec.name,
            proto.normalizer_spec.add_dummy_prefix,
        )
    if spec.model_type == UNIGRAM:
        log.warning(
            "%s is a unigram model: llama.cpp segments it by merging best-scored pairs, not by "
            "Viterbi, so some words may get other pieces than SentencePiece gives them",
            folder / MODEL_FILE,
        )
    pieces, scores, types = vocab_entries(folder, vocab_size)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", pieces)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    if spec.model_type == BPE:
        mergeable = {p.piece for p in proto.pieces if p.type == NORMAL}
        merges = bpe_merges([p.piece for p in proto.pieces], mergeable)
        writer.add_array("tokenizer.ggml.merges", [f"{a} {b}" for a, b in merges])
    ids = special_ids(spec, types)
    for key, token_id in ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}", token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", "bos_token_id" in ids)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.add_bool("tokenizer.ggml.add_space_prefix", bool(proto.normalizer_spec.add_dummy_prefix))
    if chat_template:
        writer.add_string("tokenizer.chat_template", chat_template)
    return ids


def special_ids(spec, types: list[int]) -> dict[str, int]:
    """GGUF's special-token keys -> ids, for those the SentencePiece model defines (id >= 0)."""
    named = {
        "bos_token_id": spec.bos_id,
        "eos_token_id": spec.eos_id,
        "unknown_token_id": spec.unk_id,
        "padding_token_id": spec.pad_id,
    }
    ids = {k: int(v) for k, v in named.items() if v >= 0}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if key in ids and types[ids[key]] != CONTROL:
            log.warning("%s %d is not a control piece (type %d)", key, ids[key], types[ids[key]])
    return ids


def read_chat_template(folder: Path) -> str | None:
    """The chat template of a Hugging Face folder (chat_template.jinja or tokenizer_config.json)."""
    import json

    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        template = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None
