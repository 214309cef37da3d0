"""Megatron / GPT-NeoX `MMIDIDX` token files: a streaming writer and a validating mmap reader.

Layout (byte-compatible with GPT-NeoX `megatron/data/indexed_dataset.py`):

    .idx  b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N | u64 D
          | int32 sizes[N] | int64 byte pointers[N] | int64 doc_idx[D]
    .bin  the tokens of all N sequences back to back

We write one sequence per document, so doc_idx = [0, 1, ..., N].
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float64,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
                 np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.uint16): 8}


def best_dtype(vocab_size: int) -> np.dtype:
    """GPT-NeoX's rule: uint16 when the vocabulary fits comfortably, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BinIdxWriter:
    """Streams documents into `PREFIX.bin.tmp`; `finish()` writes the index, fsyncs, then renames both.

    Until `finish()` returns, only `.tmp` files exist, so a killed run never leaves
    a `.bin`/`.idx` pair that could pass for a complete one.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{bin_path(self.prefix)}.tmp")
        self._idx_tmp = Path(f"{idx_path(self.prefix)}.tmp")
        self._sizes = array("q")
        self.tokens = 0
        self._bin = open(self._bin_tmp, "wb")  # last: an interrupted constructor leaves nothing open

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)
        self.tokens += arr.size

    def add_documents(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Many documents at once: `flat` holds them back to back, `sizes` their lengths."""
        flat = np.asarray(flat, dtype=self.dtype)
        self._bin.write(flat.tobytes(order="C"))
        self._sizes.extend(int(s) for s in sizes)
        self.tokens += flat.size

    @property
    def documents(self) -> int:
        return len(self._sizes)

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if len(self._sizes) else np.zeros(0, np.int64)
        write_index(self._idx_tmp, self.dtype, sizes, np.arange(len(sizes) + 1, dtype=np.int64))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        _fsync_dir(self.prefix)

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)


def write_index(path: Path, dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and sizes.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: a document has more than 2^31 tokens")
    pointers = np.zeros(sizes.size, dtype=np.int64)
    if sizes.size:
        np.cumsum(sizes[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)]))
        f.write(struct.pack("<Q", sizes.size))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.asarray(doc_idx, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


class MMapIndexedDataset:
    """Read-only view of `PREFIX.bin`/`PREFIX.idx`; every check failure names the file and the problem.

    Opening always checks what costs O(1) whatever the index size: both files exist, the header, the
    `.idx` size against its counts, and the `.bin` size against where the last sequence ends. The
    per-sequence entries (pointers, sizes, doc_idx) are checked

    - all of them, vectorised over the memory map in bounded chunks, by `validate()` (the default,
      `lazy=False`: data_prep and the tools, which read whole shards anyway);
    - with `lazy=True`, only as they are read: `ds[i]` checks sequence i, `validate(lo, hi)` a range.
      The trainer opens shards so: every rank opens every shard, and checking a 10^8-document index
      in each of hundreds of ranks would cost minutes and, vectorised whole, GiBs of copies each.

    Memory stays flat in the index size either way: the index is a memory map, and no check makes
    more than a chunk-sized temporary.
    """

    # Sequences per vectorised check: ~40 bytes of temporaries each, so ~40 MB at most.
    CHECK_CHUNK = 1 << 20

    def __init__(self, prefix: str | os.PathLike, lazy: bool = False):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        self._ipath, self._bpath = ipath, bpath
        for p in (ipath, bpath):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing (binidx needs both {ipath.name} and {bpath.name})")
        idx_len = ipath.stat().st_size
        with open(ipath, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise ValueError(f"{ipath}: truncated header ({len(head)} of {HEADER_SIZE} bytes)")
        if head[:9] != MAGIC:
            raise ValueError(f"{ipath}: not an MMIDIDX index (bad magic {head[:9]!r})")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise ValueError(f"{ipath}: unsupported index version {version}")
        (code,) = struct.unpack("<B", head[17:18])
        if code not in DTYPE_CODES:
            raise ValueError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack("<QQ", head[18:34])
        expected = HEADER_SIZE + 4 * n + 8 * n + 8 * d
        if idx_len != expected:
            raise ValueError(
                f"{ipath}: size {idx_len} bytes does not match its header "
                f"({n} sequences, {d} doc_idx entries need {expected} bytes); truncated or corrupt"
            )
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx, dtype="<i4", count=n, offset=off)
        off += 4 * n
        self.pointers = np.frombuffer(self._idx, dtype="<i8", count=n, offset=off)
        off += 8 * n
        self.doc_idx = np.frombuffer(self._idx, dtype="<i8", count=d, offset=off)

        # The .bin must end where the last sequence ends (all sequences lie back to back from 0,
        # which validate() checks entry by entry): catches a truncated .bin or one from another run.
        self._bin_len = bin_len = bpath.stat().st_size
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_len != end:
            raise ValueError(
                f"{bpath}: size {bin_len} bytes does not match {ipath.name} (its last sequence ends at "
                f"byte {end}: {end // self.dtype.itemsize} tokens of {self.dtype}); "
                "truncated or from another run"
            )
        if d and (self.doc_idx[0] != 0 or self.doc_idx[-1] != n):
            raise ValueError(f"{ipath}: doc_idx is not a non-decreasing list from 0 to {n}")
        if bin_len:
            self.tokens = np.memmap(bpath, mode="r", dtype=self.dtype)
        else:  # np.memmap refuses empty files
            self.tokens = np.zeros(0, dtype=self.dtype)
        if not lazy:
            self.validate()

    def validate(self, start: int = 0, stop: int | None = None) -> None:
        """Check sequences [start, stop) (all by default): sizes >= 0, each pointer where the one
        before ends (the first at 0), inside the .bin; with the whole range also doc_idx."""
        n = len(self.sizes)
        stop = n if stop is None else min(stop, n)
        isz = self.dtype.itemsize
        for lo in range(max(start, 0), stop, self.CHECK_CHUNK):
            hi = min(lo + self.CHECK_CHUNK, stop)
            sizes = self.sizes[lo:hi]
            if sizes.min() < 0:
                bad = lo + int(np.argmax(sizes < 0))
                raise ValueError(f"{self._ipath}: negative size {int(self.sizes[bad])} of sequence {bad}")
            ptr = self.pointers[lo:hi]
            ends = ptr + sizes.astype(np.int64) * isz
            first = int(self.pointers[lo - 1]) + int(self.sizes[lo - 1]) * isz if lo else 0
            misplaced = ptr[0] != first or ptr[0] < 0 or ptr[0] % isz
            if misplaced or np.any(ptr[1:] != ends[:-1]) or ends[-1] > self._bin_len:
                raise ValueError(
                    f"{self._ipath}: byte pointers disagree with the sequence sizes "
                    f"(sequences {lo}..{hi - 1}; the data are corrupt)"
                )
            del ends
        if start <= 0 and stop == n:
            doc_idx, d = self.doc_idx, len(self.doc_idx)
            for lo in range(0, max(d - 1, 0), self.CHECK_CHUNK):
                hi = min(lo + self.CHECK_CHUNK + 1, d)
                if np.any(doc_idx[lo + 1 : hi] < doc_idx[lo : hi - 1]):
                    raise ValueError(f"{self._ipath}: doc_idx is not a non-decreasing list from 0 to {n}")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} in {self.prefix})")
        self.validate(i, i + 1)  # O(1): the entry read, and that it follows the one before
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        doc = self[i]
        return doc[offset : None if length is None else offset + length]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)
