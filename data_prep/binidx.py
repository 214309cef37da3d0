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
    """Read-only view of `PREFIX.bin`/`PREFIX.idx`; every check failure names the file and the problem."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
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

        n_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_len = bpath.stat().st_size
        if bin_len != n_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{bpath}: size {bin_len} bytes does not match {ipath.name} "
                f"({n_tokens} tokens of {self.dtype} = {n_tokens * self.dtype.itemsize} bytes); "
                "truncated or from another run"
            )
        if n and (self.pointers[0] != 0 or np.any(
            self.pointers[1:] != np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize)
        )):
            raise ValueError(f"{ipath}: byte pointers disagree with the sequence sizes")
        if n and (self.sizes.min() < 0):
            raise ValueError(f"{ipath}: negative sequence size")
        if d and (self.doc_idx[0] != 0 or self.doc_idx[-1] != n or np.any(np.diff(self.doc_idx) < 0)):
            raise ValueError(f"{ipath}: doc_idx is not a non-decreasing list from 0 to {n}")
        if bin_len:
            self.tokens = np.memmap(bpath, mode="r", dtype=self.dtype)
        else:  # np.memmap refuses empty files
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} in {self.prefix})")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        doc = self[i]
        return doc[offset : None if length is None else offset + length]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)
