"""Perplexity of a causal LM folder on a text file or on token shards.

Sources:
- a token folder with `manifest.json` (one split, verified, and its tokenizer fingerprint must be
  the model folder's `tokenizer.model`), or one shard given as its `.bin`/`.idx`/prefix path:
  the stored token stream as is;
- a `.jsonl` file: each line's `text` field (or the one named) becomes `BOS + tokens + EOS` (as in the token shards);
- any other file: its whole text as `BOS + tokens + EOS`.
The stream (capped at `max_tokens`) is cut into non-overlapping windows of `seq_len` tokens; each
window scores its tokens after the first (the first has no context), so the reported perplexity
is exp(mean negative log-likelihood) over `tokens_scored` predictions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import DataError

log = logging.getLogger(__name__)


def shard_prefix(path: Path) -> Path | None:
    """The `<prefix>` of a `.bin`/`.idx` pair named by either file or by the prefix; None otherwise."""
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    return prefix if prefix.with_suffix(".idx").is_file() else None


def shard_tokens(source: Path, split: str, model_dir: Path) -> np.ndarray:
    """Concatenated tokens of a token folder's split (manifest verified) or of one shard."""
    from pipeline.data.indexed import IndexedDataset
    from pipeline.data.manifest import split_prefixes, verify_manifest

    if (source / "manifest.json").is_file():
        fingerprint = None
        if (model_dir / "tokenizer.model").is_file():
            from pipeline.tokenizer.hf import fingerprint as tokenizer_fingerprint

            fingerprint = tokenizer_fingerprint(model_dir)
        manifest = verify_manifest(source, checksums=False, fingerprint=fingerprint)
        prefixes = split_prefixes(source, manifest, split)
    else:
        prefixes = [shard_prefix(source)]
    parts = [np.asarray(IndexedDataset(p).tokens, dtype=np.int64) for p in prefixes]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def text_tokens(source: Path, tokenizer, field: str = "text") -> np.ndarray:
    """BOS + tokens + EOS per JSONL record's `field`, or for the whole file."""
    try:
        raw = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read as UTF-8 text: {exc}") from None
    texts, bad = [raw], 0
    if source.suffix == ".jsonl":
        texts = []
        for line in raw.splitlines():
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get(field), str):
                texts.append(rec[field])
            elif line.strip():
                bad += 1
        if not texts:
            raise DataError(f"{source}: no JSONL line has a string `{field}` field ({bad} lines skipped)")
        if bad:
            log.warning("%s: skipped %d lines without a string `%s`", source, bad, field)
    ids = []
    for text in texts:
        ids += [
            tokenizer.bos_token_id,
            *tokenizer.encode(text, add_special_tokens=False),
            tokenizer.eos_token_id,
        ]
    return np.asarray(ids, dtype=np.int64)


def load_tokens(
    source: Path, tokenizer, model_dir: Path, split: str = "valid", field: str = "text"
) -> np.ndarray:
    """The token stream of a source (see the module docstring)."""
    source = Path(source)
    if (source / "manifest.json").is_file() or shard_prefix(source) is not None:
        return shard_tokens(source, split, Path(model_dir))
    if not source.is_file():
        raise DataError(f"{source}: not a text file, token folder (manifest.json) or .bin/.idx shard")
    return text_tokens(source, tokenizer, field)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8) -> dict[str, float]:
    """{tokens_scored, nll, ppl} of `model` over non-overlapping windows of `tokens`."""
    if tokens.size < 2:
        raise DataError(f"need at least 2 tokens to score, got {tokens.size}")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab:
        raise DataError(f"token id {int(tokens.max())} is outside the model's vocabulary ({vocab})")
    windows = [tokens[i : i + seq_len] for i in range(0, tokens.size, seq_len)]
    windows = [w for w in windows if w.size >= 2]
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        T = max(w.size for w in chunk)
        ids = torch.zeros((len(chunk), T), dtype=torch.long)
        targets = torch.full((len(chunk), T), -100, dtype=torch.long)
        for i, w in enumerate(chunk):
            ids[i, : w.size] = torch.from_numpy(w)
            targets[i, : w.size] = torch.from_numpy(w)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, vocab)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), reduction="sum"))
        count += int((targets[:, 1:] != -100).sum())
    nll = total / count
    return {"tokens_scored": count, "nll": nll, "ppl": math.exp(min(nll, 700.0))}


def run_cli(args) -> dict[str, float]:
    """What launch/evaluate.py does with its parsed arguments: print (and return) the result."""
    from pipeline.finetune.generate import load_model

    if args.seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {args.seq_len}")
    model, tokenizer = load_model(args.model)
    tokens = load_tokens(args.data, tokenizer, args.model, args.split, getattr(args, "field", "text"))
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    result = perplexity(model, tokens, args.seq_len, args.batch_size)
    print(json.dumps({"data": str(args.data), **result}))
    return result
