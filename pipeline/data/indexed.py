"""Megatron-LM's indexed dataset format (`.bin` tokens + `.idx` index), writer and reader.

Layout of `.idx` (all little-endian), as read by Megatron-LM, GPT-NeoX and Megatron-DeepSpeed:
    magic b"MMIDIDX\\x00\\x00" (9) | version u64 = 1 | dtype code u8 | S u64 | D1 u64
    | sequence_lengths int32[S] | sequence_pointers int64[S] (byte offsets into .bin)
    | document_indices int64[D1] (starts at 0, ends at S)
`.bin` is the token ids of every sequence, concatenated, in the dtype of the header.
We write one sequence per document (no sentence splitting), so D1 = S + 1.
"""

from __future__ import annotations

import contextlib
import hashlib
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


class IndexedWriter:
    """Streams documents into `<prefix>.bin`; `finish()` then writes `<prefix>.idx`.

    Both files are written to temp names and renamed, `.bin` first: a reader opens a pair through
    its `.idx`, so it never sees a half-written shard. Memory holds only the document lengths. Use
    it as a context manager: an exception before `finish()` removes the temp file. `bin_sha256` is
    the sha256 of the `.bin`, computed while writing.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self._range = np.iinfo(self.dtype)
        self._stack = contextlib.ExitStack()
        self._fh = self._stack.enter_context(atomic_write(bin_path(prefix)))
        self._lengths: list[int] = []
        self.tokens, self.bin_sha256, self.done = 0, hashlib.sha256(), False

    def add(self, seq: np.ndarray) -> None:
        """Append one document's tokens; DataError if an id does not fit the dtype."""
        arr = np.asarray(seq)
        if arr.size and (arr.min() < self._range.min or arr.max() > self._range.max):
            raise DataError(
                f"{self.prefix}: token id out of range for {self.dtype} ({arr.min()}..{arr.max()})"
            )
        if arr.size >= 2**31:
            raise DataError(f"{self.prefix}: a document has {arr.size} tokens; .idx lengths are int32")
        data = arr.astype(self.dtype, copy=False).tobytes(order="C")
        self._fh.write(data)
        self.bin_sha256.update(data)
        self._lengths.append(arr.size)
        self.tokens += arr.size

    def finish(self) -> tuple[int, int]:
        """Publish `.bin`, write `.idx`; returns (documents, tokens)."""
        self._stack.close()  # fsync + rename of the .bin
        self.done = True
        lengths = np.asarray(self._lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)  # int64: Megatron PR #1673 overflow fix
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        with atomic_write(idx_path(self.prefix)) as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<QBQQ", VERSION, CODE_OF[self.dtype], len(lengths), len(doc_idx)))
            fh.write(lengths.astype("<i4").tobytes())
            fh.write(pointers.astype("<i8").tobytes())
            fh.write(doc_idx.astype("<i8").tobytes())
        return len(lengths), self.tokens

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()

    def abort(self) -> None:
        """Discard the temp `.bin` unless finish() published it; nothing is left behind."""
        if not self.done:
            self.done = True
            stop = DataError(f"{self.prefix}: writing abandoned")
            self._stack.__exit__(DataError, stop, None)  # atomic_write removes its temp file


def write_indexed(prefix: str | Path, sequences: list[np.ndarray], dtype: np.dtype) -> tuple[int, int]:
    """Write documents (one token array each) to `<prefix>.bin/.idx`, atomically.

    Returns (documents, tokens). Arrays are cast to `dtype`; ids that do not fit raise.
    """
    with IndexedWriter(prefix, dtype) as writer:
        for seq in sequences:
            writer.add(seq)
        return writer.finish()


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
