"""binidx compatibility: our writer/reader against an independent implementation of the MMIDIDX format.

`neox_write`/`neox_read` below are written from the format description (GPT-NeoX
`megatron/data/indexed_dataset.py`: MMapIndexedDatasetBuilder / MMapIndexedDataset),
with struct and numpy only, not with our code.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from data_prep.binidx import BinIdxWriter, MMapIndexedDataset, best_dtype

NEOX_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
              8: np.uint16}


def neox_write(prefix, docs: list[list[list[int]]], dtype) -> None:
    """GPT-NeoX builder: add_item per sentence, end_document after each document."""
    code = {np.dtype(v): k for k, v in NEOX_CODES.items() if k != 6}[np.dtype(dtype)]
    sizes, doc_idx = [], [0]
    with open(f"{prefix}.bin", "wb") as f:
        for doc in docs:
            for sentence in doc:
                f.write(np.array(sentence, dtype=dtype).tobytes(order="C"))
                sizes.append(len(sentence))
            doc_idx.append(len(sizes))
    itemsize = np.dtype(dtype).itemsize
    pointers, address = [], 0
    for s in sizes:
        pointers.append(address)
        address += s * itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(sizes, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array(doc_idx, dtype=np.int64).tobytes(order="C"))


def neox_read(prefix) -> tuple[np.dtype, list[np.ndarray], np.ndarray]:
    with open(f"{prefix}.idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", f.read(8)) == (1,)
        (code,) = struct.unpack("<B", f.read(1))
        dtype = np.dtype(NEOX_CODES[code])
        (n,) = struct.unpack("<Q", f.read(8))
        (d,) = struct.unpack("<Q", f.read(8))
        sizes = np.frombuffer(f.read(4 * n), dtype=np.int32)
        pointers = np.frombuffer(f.read(8 * n), dtype=np.int64)
        doc_idx = np.frombuffer(f.read(8 * d), dtype=np.int64)
        assert f.read() == b""
    data = open(f"{prefix}.bin", "rb").read()
    seqs = [np.frombuffer(data, dtype=dtype, count=int(s), offset=int(p)) for s, p in zip(sizes, pointers,
                                                                                         strict=True)]
    return dtype, seqs, doc_idx


def random_docs(rng, n, vocab, eod=0):
    return [list(rng.integers(1, vocab, size=int(rng.integers(0, 50)))) + [eod] for _ in range(n)]


@pytest.mark.parametrize("vocab", [2048, 50277, 65536])
def test_our_files_are_byte_identical_to_neox_and_read_back(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    docs = random_docs(rng, 200, vocab)
    dtype = best_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)

    w = BinIdxWriter(tmp_path / "ours", dtype)
    for d in docs[:50]:
        w.add_document(d)
    flat = np.concatenate([np.array(d) for d in docs[50:]])
    w.add_documents(flat, np.array([len(d) for d in docs[50:]]))
    w.finish()
    neox_write(tmp_path / "ref", [[d] for d in docs], dtype)

    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    ref_dtype, seqs, doc_idx = neox_read(tmp_path / "ours")
    assert ref_dtype == dtype
    assert [s.tolist() for s in seqs] == docs
    assert doc_idx.tolist() == list(range(201))


def test_reads_neox_files_with_several_sentences_per_document(tmp_path):
    rng = np.random.default_rng(1)
    docs = [[list(rng.integers(0, 60000, size=int(rng.integers(1, 9))))
             for _ in range(int(rng.integers(1, 4)))] for _ in range(40)]
    neox_write(tmp_path / "ref", docs, np.uint16)
    ds = MMapIndexedDataset(tmp_path / "ref")
    sentences = [s for d in docs for s in d]
    assert len(ds) == len(sentences)
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == sentences
    assert ds.sizes.tolist() == [len(s) for s in sentences]
    _, _, ref_doc_idx = neox_read(tmp_path / "ref")
    assert ds.doc_idx.tolist() == ref_doc_idx.tolist()
    assert ds.tokens.tolist() == [t for s in sentences for t in s]
    assert ds[-1].tolist() == sentences[-1]
    assert ds.get(3, 1, 2).tolist() == sentences[3][1:3]


def test_empty_dataset_round_trips(tmp_path):
    BinIdxWriter(tmp_path / "e", np.uint16).finish()
    ds = MMapIndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.n_tokens == 0
    _, seqs, doc_idx = neox_read(tmp_path / "e")
    assert seqs == [] and doc_idx.tolist() == [0]


def test_no_complete_looking_files_before_finish(tmp_path):
    w = BinIdxWriter(tmp_path / "p", np.uint16)
    w.add_document([1, 2, 3])
    assert not (tmp_path / "p.bin").exists() and not (tmp_path / "p.idx").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def _pair(tmp_path, name="d"):
    neox_write(tmp_path / name, [[[1, 2, 3]], [[4, 5]], [[6]]], np.uint16)
    return tmp_path / name


@pytest.mark.parametrize(
    "damage, file_ext, message",
    [
        (lambda b: b[:-2], ".bin", "does not match"),
        (lambda b: b + b"\x00\x00", ".bin", "does not match"),
        (lambda b: b[:-8], ".idx", "does not match its header"),
        (lambda b: b[:20], ".idx", "truncated header"),
        (lambda b: b"XXXXXXXXX" + b[9:], ".idx", "bad magic"),
        (lambda b: b[:17] + b"\x63" + b[18:], ".idx", "unknown dtype code"),
        (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], ".idx", "version"),
    ],
)
def test_refuses_damaged_files_naming_them(tmp_path, damage, file_ext, message):
    prefix = _pair(tmp_path)
    path = tmp_path / f"d{file_ext}"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as e:
        MMapIndexedDataset(prefix)
    assert str(path) in str(e.value)


def test_refuses_bin_from_another_dataset(tmp_path):
    prefix = _pair(tmp_path)
    neox_write(tmp_path / "other", [[[1, 2, 3, 4, 5, 6, 7]]], np.uint16)
    (tmp_path / "d.bin").write_bytes((tmp_path / "other.bin").read_bytes())
    with pytest.raises(ValueError, match="d.bin"):
        MMapIndexedDataset(prefix)


def test_refuses_missing_half(tmp_path):
    prefix = _pair(tmp_path)
    (tmp_path / "d.bin").unlink()
    with pytest.raises(FileNotFoundError, match="d.bin"):
        MMapIndexedDataset(prefix)


# ------------------------------------------------------------------------------------ per-entry checks
def _patch(path, offset: int, fmt: str, value: int) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))


def _five_docs(tmp_path):
    neox_write(tmp_path / "d", [[[1, 2, 3]], [[4, 5]], [[6]], [[7, 8]], [[9]]], np.uint16)
    return tmp_path / "d", tmp_path / "d.idx"


HEADER, N = 34, 5  # header bytes; documents in _five_docs (sizes at 34, pointers at 34 + 4N, doc_idx after)


@pytest.mark.parametrize(
    "fmt, offset, value, message",
    [
        ("<q", HEADER + 4 * N + 8 * 2, 2, "pointers disagree"),  # doc 2 overlaps doc 1
        ("<q", HEADER + 4 * N + 8 * 2, 11, "pointers disagree"),  # misaligned for uint16
        ("<i", HEADER + 4 * 2, -1, "negative size -1 of sequence 2"),
    ],
)
def test_bad_entry_found_by_full_open_and_by_reading_it_lazily(tmp_path, fmt, offset, value, message):
    prefix, idx = _five_docs(tmp_path)
    _patch(idx, offset, fmt, value)
    with pytest.raises(ValueError, match=message) as e:
        MMapIndexedDataset(prefix)
    assert str(idx) in str(e.value)
    lazy = MMapIndexedDataset(prefix, lazy=True)  # O(1) checks only: the entry is not read yet
    assert lazy[0].tolist() == [1, 2, 3] and lazy[4].tolist() == [9]
    with pytest.raises(ValueError, match=message):
        lazy[2]
    with pytest.raises(ValueError, match=message):
        lazy.validate(1, 4)
    lazy.validate(4, 5)


def test_lazy_open_still_checks_sizes_and_doc_idx_ends(tmp_path):
    prefix, idx = _five_docs(tmp_path)
    _patch(idx, HEADER + 4 * 4, "<i", 3)  # last document longer than the .bin holds
    with pytest.raises(ValueError, match="d.bin: size 18 bytes does not match"):
        MMapIndexedDataset(prefix, lazy=True)
    prefix, idx = _five_docs(tmp_path)
    _patch(idx, HEADER + 12 * N + 8 * 3, "<q", 1)  # doc_idx [0 1 2 1 4 5]: not non-decreasing
    MMapIndexedDataset(prefix, lazy=True)  # only a full validation reads every doc_idx entry
    with pytest.raises(ValueError, match="doc_idx is not a non-decreasing"):
        MMapIndexedDataset(prefix)
    _patch(idx, HEADER + 12 * N + 8 * N, "<q", 4)  # ... but the last one must be N
    with pytest.raises(ValueError, match="doc_idx"):
        MMapIndexedDataset(prefix, lazy=True)


def _synthetic(tmp_path, n: int):
    """An index of n one-token documents and its (sparse) .bin: only the .idx takes disk."""
    from data_prep.binidx import write_index

    prefix = tmp_path / f"n{n}"
    write_index(prefix.with_suffix(".idx"), np.dtype(np.uint16), np.ones(n, np.int64), np.arange(n + 1))
    with open(prefix.with_suffix(".bin"), "wb") as f:
        f.truncate(2 * n)
    return prefix


def _peak_bytes(fn) -> int:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_flat_in_the_index_size(tmp_path, monkeypatch):
    """Opening (lazily, as every training rank does) and reading what a rank reads allocates the same
    at N and 10N documents; so does a full validation, chunk by chunk. Checking all entries at once
    (np.cumsum over the pointers, as the reader used to) needs ~30 bytes a document: 30 MB at 10N."""
    small, big = _synthetic(tmp_path, 100_000), _synthetic(tmp_path, 1_000_000)

    def rank_reads(prefix):
        ds = MMapIndexedDataset(prefix, lazy=True)
        for i in (0, len(ds) // 2, len(ds) - 1):
            assert ds[i].tolist() == [0]
        ds.validate(len(ds) - 1000, len(ds))  # e.g. the held-out documents

    lazy_small, lazy_big = _peak_bytes(lambda: rank_reads(small)), _peak_bytes(lambda: rank_reads(big))
    assert lazy_big < lazy_small + 64 * 1024 and lazy_big < 512 * 1024, (lazy_small, lazy_big)

    monkeypatch.setattr(MMapIndexedDataset, "CHECK_CHUNK", 10_000)
    full_small = _peak_bytes(lambda: MMapIndexedDataset(small))
    full_big = _peak_bytes(lambda: MMapIndexedDataset(big))
    assert full_big < full_small * 1.25 + 64 * 1024 and full_big < 2 * 1024 * 1024, (full_small, full_big)
