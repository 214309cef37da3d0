"""Streaming input readers: `.jsonl`, `.jsonl.zst`, `.parquet`, `.txt`.

Each reader yields *raw records* in file order without holding the file:
JSON lines as bytes (parsed later, in worker processes), parquet rows as
(text, pile_set_name) tuples, a text document as bytes. Blank lines are not
records. `count_and_hash` walks a file once to count its records and checksum
its bytes, so that shards can be cut at fixed record numbers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

READ_BLOCK = 1 << 20
SUFFIXES = (".jsonl.zst", ".json.zst", ".jsonl", ".json", ".parquet", ".txt")
TXT_MODES = ("file", "paragraph", "line")


class CorruptInputError(ValueError):
    """An input file that cannot be read to its end (truncated or corrupt compression)."""

    def __init__(self, path: str | os.PathLike, offset: int, problem: str):
        self.path, self.offset, self.problem = str(path), offset, problem
        super().__init__(f"{path}: {problem} at compressed byte offset {offset}")


def input_kind(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return {".jsonl.zst": "jsonl.zst", ".json.zst": "jsonl.zst", ".json": "jsonl"}.get(
                suffix, suffix[1:]
            )
    raise ValueError(f"{path}: unsupported input type (expected one of {', '.join(SUFFIXES)})")


class _HashingFile:
    """Wraps a binary file: checksums and counts the bytes as they are read."""

    def __init__(self, path: Path, hasher: Any | None):
        self._f = open(path, "rb")
        self._h = hasher
        self.offset = 0

    def read(self, n: int) -> bytes:
        b = self._f.read(n)
        self.offset += len(b)
        if self._h is not None:
            self._h.update(b)
        return b

    def close(self) -> None:
        self._f.close()


def _zst_blocks(path: Path, hasher: Any | None = None) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-frame) .zst file; raises CorruptInputError with the offset."""
    f = _HashingFile(path, hasher)
    dctx = zstandard.ZstdDecompressor()
    try:
        dobj = dctx.decompressobj()
        pending = b""
        frame_done = True  # an empty file holds no frame, and no records
        while True:
            block = pending or f.read(READ_BLOCK)
            pending = b""
            if not block:
                break
            try:
                out = dobj.decompress(block)
            except zstandard.ZstdError as e:
                raise CorruptInputError(path, f.offset, f"corrupt zstd data ({e})") from e
            if out:
                yield out
            if dobj.eof:
                # A frame ended; whatever follows belongs to the next frame.
                pending = dobj.unused_data
                dobj = dctx.decompressobj()
                frame_done = True
            else:
                frame_done = False
        if not frame_done:
            raise CorruptInputError(path, f.offset, "truncated zstd stream (the last frame is incomplete)")
    finally:
        f.close()


def _plain_blocks(path: Path, hasher: Any | None = None) -> Iterator[bytes]:
    f = _HashingFile(path, hasher)
    try:
        while block := f.read(4 * READ_BLOCK):
            yield block
    finally:
        f.close()


def _lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Non-blank lines (without the newline) from a stream of blocks."""
    rest = b""
    for block in blocks:
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for line in parts:
            if line.strip():
                yield line
    if rest.strip():
        yield rest


def _paragraphs(lines_with_blanks: Iterator[bytes]) -> Iterator[bytes]:
    buf: list[bytes] = []
    for line in lines_with_blanks:
        if line.strip():
            buf.append(line)
        elif buf:
            yield b"\n".join(buf)
            buf = []
    if buf:
        yield b"\n".join(buf)


def _all_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        yield from parts
    yield rest


def _parquet_rows(path: Path, text_key: str) -> Iterator[tuple[Any, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_key not in names:
        raise ValueError(f"{path}: parquet file has no column '{text_key}' (columns: {names})")
    cols = [text_key] + [c for c in ("meta", "pile_set_name") if c in names]
    for batch in pf.iter_batches(batch_size=4096, columns=cols):
        data = batch.to_pydict()
        texts = data[text_key]
        if "pile_set_name" in data:
            sets = data["pile_set_name"]
        elif "meta" in data:
            sets = [m.get("pile_set_name") if isinstance(m, dict) else None for m in data["meta"]]
        else:
            sets = [None] * len(texts)
        yield from zip(texts, sets, strict=True)


def iter_records(
    path: str | os.PathLike, text_key: str = "text", txt_mode: str = "file", hasher: Any | None = None
) -> Iterator[Any]:
    """Raw records of one file, in order (see the module docstring for their types)."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "jsonl.zst":
        yield from _lines(_zst_blocks(path, hasher))
    elif kind == "jsonl":
        yield from _lines(_plain_blocks(path, hasher))
    elif kind == "parquet":
        yield from _parquet_rows(path, text_key)
    elif kind == "txt":
        if txt_mode == "file":
            # One document per file: the text is needed whole to be tokenized anyway.
            yield TextBytes(b"".join(_plain_blocks(path, hasher)))
        elif txt_mode == "paragraph":
            yield from (TextBytes(p) for p in _paragraphs(_all_lines(_plain_blocks(path, hasher))))
        elif txt_mode == "line":
            yield from (TextBytes(p) for p in _lines(_plain_blocks(path, hasher)))
        else:
            raise ValueError(f"unknown txt mode {txt_mode!r} (one of {TXT_MODES})")


class TextBytes(bytes):
    """Raw UTF-8 text of one document from a .txt file (as opposed to a JSON line)."""


def count_and_hash(path: str | os.PathLike, text_key: str = "text", txt_mode: str = "file") -> dict:
    """One pass over a file: its size, sha256 and number of records."""
    path = Path(path)
    h = hashlib.sha256()
    if input_kind(path) == "parquet":
        import pyarrow.parquet as pq

        for _ in _plain_blocks(path, h):
            pass
        records = pq.ParquetFile(path).metadata.num_rows
    else:
        records = sum(1 for _ in iter_records(path, text_key, txt_mode, hasher=h))
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest(), "records": records}
