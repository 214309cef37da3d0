"""Streaming input readers: `.jsonl`, `.jsonl.zst`, `.parquet`, `.arrow`, `.txt`, and Hugging Face datasets.

Each reader yields *raw records* in file order without holding the file:
JSON lines as bytes (parsed later, in worker processes), parquet rows as
(text, pile_set_name) tuples, a text document as bytes. Blank lines are not
records. `count_and_hash` walks a file once to count its records and checksum
its bytes, so that shards can be cut at fixed record numbers.

A Hugging Face dataset is one input, like a file: a `Dataset.save_to_disk`
directory, or `hf:NAME[:CONFIG]:SPLIT` (a hub id or a local dataset directory,
read by `datasets.load_dataset`). Its rows come as (text, pile_set_name) tuples
in the dataset's own order, and the row number is the resume position.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import zstandard

READ_BLOCK = 1 << 20
SUFFIXES = (".jsonl.zst", ".json.zst", ".jsonl", ".json", ".parquet", ".arrow", ".txt")
HF_PREFIX = "hf:"
DATASET_KINDS = ("hf_disk", "hf_hub")  # inputs that are not one file
BATCH_ROWS = 4096
TXT_MODES = ("file", "paragraph", "line")


class CorruptInputError(ValueError):
    """An input file that cannot be read to its end (truncated or corrupt compression)."""

    def __init__(self, path: str | os.PathLike, offset: int, problem: str):
        self.path, self.offset, self.problem = str(path), offset, problem
        super().__init__(f"{path}: {problem} at compressed byte offset {offset}")


def input_kind(path: str | os.PathLike) -> str:
    if str(path).startswith(HF_PREFIX):
        return "hf_hub"
    if is_saved_dataset(path):
        return "hf_disk"
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


def _columns(path: Any, what: str, names: list[str], text_key: str) -> list[str]:
    """The columns to read: the text and, where present, the set name's."""
    if text_key not in names:
        raise ValueError(f"{path}: {what} has no column '{text_key}' (columns: {names})")
    return [text_key] + [c for c in ("meta", "pile_set_name") if c in names]


def _batch_rows(data: dict[str, list], text_key: str) -> Iterator[tuple[Any, Any]]:
    """(text, pile_set_name) per row of a column batch (a `to_pydict()`)."""
    texts = data[text_key]
    if "pile_set_name" in data:
        sets = data["pile_set_name"]
    elif "meta" in data:
        sets = [m.get("pile_set_name") if isinstance(m, dict) else None for m in data["meta"]]
    else:
        sets = [None] * len(texts)
    yield from zip(texts, sets, strict=True)


def _parquet_rows(path: Path, text_key: str) -> Iterator[tuple[Any, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    cols = _columns(path, "parquet file", pf.schema_arrow.names, text_key)
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        yield from _batch_rows(batch.to_pydict(), text_key)


def _open_arrow(path: Path) -> Any:
    """A record-batch reader of an Arrow IPC file: stream format (what `datasets` writes) or file format."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not an Arrow IPC stream or file ({e})") from e


def _arrow_rows(path: Path, text_key: str) -> Iterator[tuple[Any, Any]]:
    reader = _open_arrow(path)
    cols = _columns(path, "arrow file", reader.schema.names, text_key)
    if hasattr(reader, "num_record_batches"):  # file format: random access by batch number
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = reader
    for batch in batches:
        yield from _batch_rows(batch.select(cols).to_pydict(), text_key)


def _arrow_num_rows(path: Path) -> int:
    reader = _open_arrow(path)
    if hasattr(reader, "num_record_batches"):
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return sum(b.num_rows for b in reader)


# ---------------------------------------------------------------- Hugging Face datasets


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    p = Path(path)
    return p.is_dir() and (
        ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
        or (p / "dataset_dict.json").is_file()
    )


def parse_hf_name(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG]:SPLIT` -> (NAME, CONFIG or None, SPLIT)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{spec}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT (e.g. hf:wikitext:"
                         "wikitext-2-raw-v1:train)")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def hf_offline() -> bool:
    """HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1: `load_dataset` must use its cache, not the hub."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()  # the prep's own bars report progress
    datasets.logging.set_verbosity_error()
    return datasets


def load_saved_dataset(path: str | os.PathLike) -> Any:
    datasets = _quiet_datasets()
    if (Path(path) / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in Path(path).iterdir() if (d / "state.json").is_file())
        raise ValueError(f"{path}: a DatasetDict with splits {splits}; give one split's directory, "
                         f"e.g. {Path(path) / (splits[0] if splits else 'train')}")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to open is this input's one-line error
        raise ValueError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {_first_line(e)})") \
            from e


def load_hub_dataset(spec: str) -> Any:
    """The split as a streaming IterableDataset online, or from the local cache when offline."""
    datasets = _quiet_datasets()
    name, config, split = parse_hf_name(spec)
    # Streaming reads the hub's files directly and so needs the network; offline, a non-streaming
    # load is what reads the prepared Arrow files of an earlier download from the cache.
    streaming = not hf_offline()
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - not found, offline without a cache, bad split: one line each
        where = "the local cache (offline)" if not streaming else "the hub or a local directory"
        raise ValueError(f"{spec}: cannot load from {where} ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _dataset_rows(ds: Any, label: str, text_key: str) -> Iterator[tuple[Any, Any]]:
    """(text, pile_set_name) per row of a Dataset or IterableDataset, in its order."""
    names = ds.column_names
    if names is None:  # a streamed dataset whose features are unknown until read
        for row in ds:
            one = {k: [v] for k, v in row.items()} | {text_key: [row.get(text_key)]}
            yield from _batch_rows(one, text_key)
        return
    cols = _columns(label, "dataset", list(names), text_key)
    for batch in ds.select_columns(cols).iter(batch_size=BATCH_ROWS):
        yield from _batch_rows(batch, text_key)


def _dataset(path: Path | str) -> tuple[Any, str]:
    spec = str(path)
    if spec.startswith(HF_PREFIX):
        return load_hub_dataset(spec), spec
    return load_saved_dataset(path), spec


def dataset_source(ds: Any, spec: str) -> dict:
    """What the manifest records about a dataset input: where it came from and which version."""
    if spec.startswith(HF_PREFIX):
        name, config, split = parse_hf_name(spec)
        src = {"type": "hf_hub", "name": name, "config": config, "split": split,
               "streaming": not hf_offline()}
    else:
        src = {"type": "hf_disk", "path": str(Path(spec).resolve()),
               "split": str(ds.split) if ds.split is not None else None}
    fp = getattr(ds, "_fingerprint", None)
    if fp is not None:
        src["fingerprint"] = fp
    return src


def iter_records(
    path: str | os.PathLike, text_key: str = "text", txt_mode: str = "file", hasher: Any | None = None
) -> Iterator[Any]:
    """Raw records of one file, in order (see the module docstring for their types)."""
    kind = input_kind(path)
    path = path if kind == "hf_hub" else Path(path)
    if kind == "jsonl.zst":
        yield from _lines(_zst_blocks(path, hasher))
    elif kind == "jsonl":
        yield from _lines(_plain_blocks(path, hasher))
    elif kind == "parquet":
        yield from _parquet_rows(path, text_key)
    elif kind == "arrow":
        yield from _arrow_rows(path, text_key)
    elif kind in DATASET_KINDS:
        ds, label = _dataset(path)
        yield from _dataset_rows(ds, label, text_key)
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


def iter_segment(
    path: str | os.PathLike, text_key: str, txt_mode: str, start: int, stop: int
) -> Iterator[Any]:
    """Records [start, stop) of one input, in order."""
    if input_kind(path) in DATASET_KINDS:
        ds, label = _dataset(path)
        # Seek, not read up to `start`: a later shard of a big dataset would otherwise turn every row
        # before it into Python objects only to drop them.
        yield from islice(_dataset_rows(ds.skip(start), label, text_key), stop - start)
    else:
        yield from islice(iter_records(path, text_key, txt_mode), start, stop)


class TextBytes(bytes):
    """Raw UTF-8 text of one document from a .txt file (as opposed to a JSON line)."""


def count_and_hash(path: str | os.PathLike, text_key: str = "text", txt_mode: str = "file") -> dict:
    """One pass over a file: its size, sha256 and number of records."""
    kind = input_kind(path)
    if kind in DATASET_KINDS:
        return _count_dataset(str(path), text_key)
    path = Path(path)
    h = hashlib.sha256()
    if kind == "arrow":
        for _ in _plain_blocks(path, h):
            pass
        records = _arrow_num_rows(path)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for _ in _plain_blocks(path, h):
            pass
        records = pq.ParquetFile(path).metadata.num_rows
    else:
        records = sum(1 for _ in iter_records(path, text_key, txt_mode, hasher=h))
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest(), "records": records}


def _count_dataset(spec: str, text_key: str) -> dict:
    """A dataset's record count and a checksum of its texts (it has no one file to hash).

    `bytes` and `sha256` are over the text column, each value JSON-encoded on its own line,
    so two runs agree on them exactly when they read the same texts in the same order.
    """
    ds, label = _dataset(spec)
    h = hashlib.sha256()
    records = nbytes = 0
    for text, _ in _dataset_rows(ds, label, text_key):
        line = json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"
        h.update(line)
        nbytes += len(line)
        records += 1
    return {"path": spec, "bytes": nbytes, "sha256": h.hexdigest(), "records": records,
            "source": {**dataset_source(ds, spec), "rows": records}}


def input_stamp(path: str | os.PathLike) -> tuple:
    """What changes when an input's content does, for the resume fingerprint and the scan cache.

    A file's is (size, mtime_ns), as before datasets were inputs, so a job started by an older
    version still resumes.
    """
    kind = input_kind(path)
    if kind == "hf_hub":
        # A hub split cannot be stat'ed; a run resumes only under the same name (see docs/data_prep.md).
        return (str(path),)
    if kind == "hf_disk":
        files = sorted(f for f in Path(path).rglob("*") if f.is_file())
        return tuple(f"{f.relative_to(path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    st = Path(path).stat()
    return (st.st_size, st.st_mtime_ns)
