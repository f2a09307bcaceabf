"""Megatron .bin/.idx: header bytes, our files vs a plain-numpy reader and writer of the layout (tokens_helpers), dtype choice, corruption."""

from __future__ import annotations

import numpy as np
import pytest
from tokens_helpers import read_by_spec, write_by_spec

from pipeline.data.indexed import IndexedDataset, bin_path, dtype_for_vocab, idx_path, write_indexed
from pipeline.errors import DataError

DOCS = [[5, 6, 7], [65000], [1, 2], [9, 9, 9, 9]]


def test_idx_header_bytes(tmp_path):
    prefix = tmp_path / "s"
    assert write_indexed(prefix, [np.array(d) for d in DOCS], np.uint16) == (4, 10)
    raw = idx_path(prefix).read_bytes()
    expected_header = (
        b"MMIDIDX\x00\x00"
        + (1).to_bytes(8, "little")
        + bytes([8])
        + (4).to_bytes(8, "little")
        + (5).to_bytes(8, "little")
    )
    assert raw[:34] == expected_header
    body = (
        np.array([3, 1, 2, 4], "<i4").tobytes()
        + np.array([0, 6, 8, 12], "<i8").tobytes()
        + np.arange(5, dtype="<i8").tobytes()
    )
    assert raw[34:] == body
    assert bin_path(prefix).read_bytes() == np.concatenate([np.array(d, "<u2") for d in DOCS]).tobytes()


@pytest.mark.parametrize("vocab", [32_000, 65_499, 65_500, 100_000])
def test_spec_reader_and_ours_agree(tmp_path, vocab):
    dtype = dtype_for_vocab(vocab)
    docs = [np.array(d) for d in DOCS] + [np.array([vocab - 1, 0])]
    write_indexed(tmp_path / "s", docs, dtype)
    spec_dtype, spec_seqs, doc_idx = read_by_spec(tmp_path / "s")
    ds = IndexedDataset(tmp_path / "s")
    assert spec_dtype == ds.dtype == dtype
    assert len(ds) == len(docs) and doc_idx.tolist() == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        assert spec_seqs[i].tolist() == ds[i].tolist() == doc.tolist()
    assert ds.num_tokens == sum(len(d) for d in docs)


@pytest.mark.parametrize(("vocab", "code"), [(32_000, 8), (65_499, 8), (65_500, 4), (100_000, 4)])
def test_spec_writer_and_ours_agree_byte_for_byte(tmp_path, vocab, code):
    rng = np.random.default_rng(vocab)
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, 50))) for _ in range(30)] + [
        np.array([vocab - 1])
    ]
    write_indexed(tmp_path / "s", docs, dtype_for_vocab(vocab))
    want_idx, want_bin = write_by_spec(docs, dtype_for_vocab(vocab))
    assert idx_path(tmp_path / "s").read_bytes() == want_idx
    assert bin_path(tmp_path / "s").read_bytes() == want_bin
    assert want_idx[17] == code  # the dtype code byte: 8 = uint16, 4 = int32


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(32_000, np.uint16), (65_499, np.uint16), (65_500, np.int32), (100_000, np.int32)]
)
def test_dtype_for_vocab(vocab, dtype):
    assert dtype_for_vocab(vocab) == np.dtype(dtype)


def test_empty_shard_round_trips(tmp_path):
    assert write_indexed(tmp_path / "e", [], np.uint16) == (0, 0)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0


def test_id_out_of_range_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="out of range"):
        write_indexed(tmp_path / "s", [np.array([70_000])], np.uint16)
    assert not bin_path(tmp_path / "s").exists()  # atomic: nothing half-written left behind


def test_corrupt_files_are_data_errors(tmp_path):
    prefix = tmp_path / "s"
    write_indexed(prefix, [np.array(d) for d in DOCS], np.uint16)
    data = bin_path(prefix).read_bytes()
    bin_path(prefix).write_bytes(data[:-2])
    with pytest.raises(DataError, match="holds 9 tokens"):
        IndexedDataset(prefix)
    bin_path(prefix).write_bytes(data)
    idx_path(prefix).write_bytes(b"NOTMAGIC!" + idx_path(prefix).read_bytes()[9:])
    with pytest.raises(DataError, match="bad magic"):
        IndexedDataset(prefix)
    idx_path(prefix).unlink()
    with pytest.raises(DataError, match="not found"):
        IndexedDataset(prefix)
