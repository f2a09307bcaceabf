"""Megatron-LM's indexed dataset format (`.bin` tokens + `.idx` index), writer and reader.

Layout of `.idx` (all little-endian), as read by Megatron-LM, GPT-NeoX and Megatron-DeepSpeed:
    magic b"MMIDIDX\\x00\\x00" (9) | version u64 = 1 | dtype code u8 | S u64 | D1 u64
    | sequence_lengths int32[S] | sequence_pointers int64[S] (byte offsets into .bin)
    | document_indices int64[D1] (starts at 0, ends at S)
`.bin` is the token ids of every sequence, concatenated, in the dtype of the header.
We write one sequence per document (no sentence splitting), so D1 = S + 1.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.io import atomic_write

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 S + 8 D1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 tokens, else int32: Megatron's `optimal_dtype` rule, so merges agree."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def write_indexed(prefix: str | Path, sequences: list[np.ndarray], dtype: np.dtype) -> tuple[int, int]:
    """Write documents (one token array each) to `<prefix>.bin/.idx`, atomically.

    Returns (documents, tokens). Arrays are cast to `dtype`; ids that do not fit raise.
    """
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if lengths.size and lengths.max() >= 2**31:
        raise DataError(f"{prefix}: a document has {lengths.max()} tokens; .idx lengths are int32")
    with atomic_write(bin_path(prefix)) as fh:
        for seq in sequences:
            arr = np.asarray(seq)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise DataError(f"{prefix}: token id out of range for {dtype} ({arr.min()}..{arr.max()})")
            fh.write(arr.astype(dtype, copy=False).tobytes(order="C"))
    pointers = np.zeros(len(sequences), dtype=np.int64)  # int64: Megatron PR #1673 overflow fix
    if len(sequences) > 1:
        np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(sequences) + 1, dtype=np.int64)
    with atomic_write(idx_path(prefix)) as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<Q", VERSION))
        fh.write(struct.pack("<B", CODE_OF[dtype]))
        fh.write(struct.pack("<Q", len(sequences)))
        fh.write(struct.pack("<Q", len(doc_idx)))
        fh.write(lengths.astype(np.int32).tobytes())
        fh.write(pointers.tobytes())
        fh.write(doc_idx.tobytes())
    return len(sequences), int(lengths.sum())


class IndexedDataset:
    """Memory-mapped reader of one `<prefix>.bin/.idx` pair; `ds[i]` is sequence i's tokens."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, binf = idx_path(prefix), bin_path(prefix)
        for p in (idx, binf):
            if not p.is_file():
                raise DataError(f"{p}: token shard file not found")
        self._idx = np.memmap(idx, dtype=np.uint8, mode="r")
        self._read_header(idx)
        self.tokens = (
            np.memmap(binf, dtype=self.dtype, mode="r") if binf.stat().st_size else np.zeros(0, self.dtype)
        )
        expected = int(self.lengths.astype(np.int64).sum())
        if self.tokens.size != expected:
            raise DataError(f"{binf}: holds {self.tokens.size} tokens but {idx} indexes {expected}")

    def _read_header(self, idx: Path) -> None:
        buf = self._idx
        if buf.size < HEADER_SIZE or bytes(buf[:9]) != MAGIC:
            raise DataError(f"{idx}: not a Megatron indexed dataset (bad magic)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", bytes(buf[9:HEADER_SIZE]))
        if version != VERSION:
            raise DataError(f"{idx}: unsupported version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx}: unknown dtype code {code}")
        need = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if buf.size < need:
            raise DataError(f"{idx}: truncated ({buf.size} bytes, header says {need})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        off = HEADER_SIZE
        self.lengths = np.frombuffer(buf, np.int32, n_seq, off)
        self.pointers = np.frombuffer(buf, np.int64, n_seq, off + 4 * n_seq)
        self.doc_indices = np.frombuffer(buf, np.int64, n_doc, off + 12 * n_seq)
        if n_doc == 0 or self.doc_indices[-1] != n_seq:
            raise DataError(f"{idx}: document index does not end at the sequence count {n_seq}")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.lengths[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)
