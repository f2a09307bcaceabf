"""Test helpers for tokenizer / token-shard / loader tests: the shipped instruction sample as documents,
a real tokenizer trained on it through pipeline.tokenizer.train, and a token folder made by tokenize_file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from pipeline.data.config import TokenizeConfig
from pipeline.data.indexed import bin_path, idx_path
from pipeline.data.manifest import write_manifest
from pipeline.data.tokenize import tokenize_file
from pipeline.io import write_jsonl_zst
from pipeline.tokenizer.config import TokenizerConfig
from pipeline.tokenizer.train import train_tokenizer

SAMPLE = Path(__file__).resolve().parent / "data" / "sample" / "instructions.jsonl"


def instruction_docs(n: int | None = None, prefix: str = "instr") -> list[dict]:
    """Document rows (id, text, source, meta) from tests/data/sample/instructions.jsonl (1,358 rows)."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()][:n]
    return [
        {
            "id": f"{prefix}/{i}",
            "text": f"{r['instruction']}\n{r['input']}\n{r['output']}",
            "source": prefix,
            "meta": {},
        }
        for i, r in enumerate(rows)
    ]


def train_small_tokenizer(folder: Path, vocab_size: int = 500, **kw) -> Path:
    """A real BPE tokenizer (ids: unk 0, bos 1, eos 2, pad 3, chat roles 4-6) trained on the sample (~1 s)."""
    write_jsonl_zst(folder / "cleaned" / "sample.jsonl.zst", instruction_docs())
    cfg = TokenizerConfig(
        name="t", inputs=[str(folder / "cleaned")], output_root=folder, vocab_size=vocab_size, **kw
    )
    return train_tokenizer(cfg)


def shared_small_tokenizer(tmp_path_factory) -> Path:
    """train_small_tokenizer's result, trained once per test session (per xdist worker) and reused."""
    folder = tmp_path_factory.getbasetemp() / "shared-small-tokenizer"
    if not (folder / "t" / "tokenizer.model").is_file():  # the folder appears atomically
        train_small_tokenizer(folder)
    return folder / "t"


def make_token_dir(
    out: Path, tok_dir: Path, shards: list[list[dict]], valid_fraction: float = 0.0
) -> tuple[Path, list[dict]]:
    """Tokenize each list of documents as one cleaned shard `part-<k>` into `out`, then write the manifest."""
    cfg, entries = TokenizeConfig(tokenizer=tok_dir, valid_fraction=valid_fraction), []
    for k, docs in enumerate(shards):
        src = out.parent / f"{out.name}-cleaned" / f"part-{k}.jsonl.zst"
        write_jsonl_zst(src, docs)
        entries += tokenize_file(src, out, cfg)
    write_manifest(out, entries, tokenizer_dir=tok_dir, config={"test": True}, lineage={"inputs": []})
    return out, entries


# Megatron .bin/.idx written and read here from the layout (magic, version 1, dtype code, int32 lengths,
# int64 byte pointers, int64 document index), independently of pipeline/data/indexed.py.


def read_by_spec(prefix: Path) -> tuple[np.dtype, list[np.ndarray], np.ndarray]:
    """Plain-numpy reader of the layout in pipeline/data/indexed.py's docstring (not our reader)."""
    raw = idx_path(prefix).read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    assert version == 1
    code = raw[17]
    dtype = np.dtype(
        {
            1: np.uint8,
            2: np.int8,
            3: np.int16,
            4: np.int32,
            5: np.int64,
            6: np.float64,
            7: np.float32,
            8: np.uint16,
        }[code]
    )
    n_seq, n_doc = struct.unpack("<QQ", raw[18:34])
    off = 34
    lengths = np.frombuffer(raw, "<i4", n_seq, off)
    pointers = np.frombuffer(raw, "<i8", n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, "<i8", n_doc, off + 12 * n_seq)
    assert len(raw) == off + 12 * n_seq + 8 * n_doc
    tokens = np.frombuffer(bin_path(prefix).read_bytes(), dtype.newbyteorder("<"))
    seqs = [tokens[p // dtype.itemsize : p // dtype.itemsize + n] for p, n in zip(pointers, lengths)]
    return dtype, seqs, doc_idx


def write_by_spec(docs: list[np.ndarray], dtype: np.dtype) -> tuple[bytes, bytes]:
    """(.idx, .bin) bytes of the layout, built here with plain numpy (not our writer)."""
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[np.dtype(dtype)]
    lengths = np.array([len(d) for d in docs], "<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype("<i8") * np.dtype(dtype).itemsize)])
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1)
    idx += (
        lengths.tobytes() + pointers.astype("<i8").tobytes() + np.arange(len(docs) + 1, dtype="<i8").tobytes()
    )
    binary = b"".join(np.asarray(d).astype(np.dtype(dtype).newbyteorder("<")).tobytes() for d in docs)
    return idx, binary
