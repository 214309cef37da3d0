"""The prep run: plan shards over the input records, tokenize chunks in worker processes, write binidx.

Why it is shaped this way:
- A first pass counts each file's records (and checksums it, for the manifest);
  shards are then fixed record ranges, so each shard is an independent unit
  of work that a re-run after a kill can skip when it is complete.
- Workers parse JSON and batch-encode a whole chunk of records per call, and a
  shard's chunks are always appended in input order, so the output does not
  depend on the worker count.
- Fewer shards than workers: this process reads each shard and hands its chunks
  out (at most a few per worker in flight, so memory stays flat). At least as
  many shards as workers: each worker reads, encodes and writes whole shards,
  so no single process has to read everything.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import BLAS_THREAD_VARS, documents
from .binidx import BinIdxWriter, MMapIndexedDataset, best_dtype
from .manifest import FORMAT, FORMAT_VERSION, manifest_path, read_json, write_json_atomic
from .output_paths import check_writable_file
from .readers import (
    DATASET_KINDS,
    HF_PREFIX,
    SUFFIXES,
    CorruptInputError,
    count_and_hash,
    input_kind,
    input_stamp,
    is_saved_dataset,
    iter_segment,
    parse_hf_name,
)
from .tokenizer import Tokenizer, load_tokenizer

CHUNK_RECORDS = 512
CHUNK_BYTES = 2 << 20


@dataclass
class PrepSettings:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shards: int = 1
    text_key: str = "text"
    append_eod: bool = True
    include_sets: list[str] | None = None
    exclude_sets: list[str] | None = None
    max_documents: int | None = None
    txt_mode: str = "file"
    skip_bad_files: bool = False
    num_nodes: int = 1
    node_rank: int = 0
    eod_token: str | None = None
    progress: bool = True


# ---------------------------------------------------------------- inputs and plan


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Globs and directories to a de-duplicated, ordered file list (each pattern's matches sorted).

    A saved dataset directory or an `hf:` name stays one input (a dataset is read as a whole).
    """
    files: list[Path] = []
    for pat in patterns:
        if pat.startswith(HF_PREFIX):
            parse_hf_name(pat)  # a malformed name fails here, before any work
            matches = [pat]
        elif is_saved_dataset(pat):
            matches = [pat]
        elif os.path.isdir(pat):
            matches = sorted(str(p) for p in Path(pat).rglob("*") if p.is_file()
                             and str(p).lower().endswith(SUFFIXES))
        elif glob.has_magic(pat):
            matches = sorted(glob.glob(pat, recursive=True))
        else:
            matches = [pat]
        if not matches:
            raise FileNotFoundError(f"{pat}: no input files match")
        for m in matches:
            p = Path(m)
            if not p.is_file() and input_kind(m) not in DATASET_KINDS:
                raise FileNotFoundError(f"{p}: input file not found")
            input_kind(p)  # refuse unsupported types before any work
            if p.resolve() not in {f.resolve() for f in files}:
                files.append(p)
    return files


def node_files(files: list[Path], num_nodes: int, node_rank: int) -> list[Path]:
    """This node's contiguous block of input files (nodes split the file list, not the records)."""
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank {node_rank} must be in [0, {num_nodes})")
    n = len(files)
    return files[node_rank * n // num_nodes : (node_rank + 1) * n // num_nodes]


def node_prefix(prefix: str, num_nodes: int, node_rank: int) -> str:
    return prefix if num_nodes == 1 else f"{prefix}-node{node_rank:03d}"


def shard_prefix(prefix: str, shards: int, k: int) -> str:
    return prefix if shards == 1 else f"{prefix}_{k:05d}"


def plan_shards(scans: list[dict], shards: int, max_records: int | None) -> list[list[dict]]:
    """Split the concatenated record stream into `shards` contiguous, near-equal record ranges."""
    total = sum(s["records"] for s in scans)
    if max_records is not None:
        total = min(total, max_records)
    bounds = [k * total // shards for k in range(shards + 1)]
    plan: list[list[dict]] = []
    for k in range(shards):
        lo, hi = bounds[k], bounds[k + 1]
        segs, base = [], 0
        for s in scans:
            a, b = max(lo, base), min(hi, base + s["records"])
            if a < b:
                segs.append({"path": s["path"], "start": a - base, "stop": b - base})
            base += s["records"]
        plan.append(segs)
    return plan


# ---------------------------------------------------------------- worker side

_W: dict[str, Any] = {}


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Workers spawned inside see one BLAS thread, unless the user chose a number; ours is unchanged."""
    unset = [v for v in BLAS_THREAD_VARS if v not in os.environ]
    os.environ.update({v: "1" for v in unset})
    try:
        yield
    finally:
        for v in unset:
            os.environ.pop(v, None)


def _init_worker(tokenizer_spec: str, eod_token: str | None, options: dict, single_threaded: bool) -> None:
    if single_threaded:
        # One process per core: the tokenizers' own thread pools would only compete with their siblings.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _W["tok"] = load_tokenizer(tokenizer_spec, eod_token=eod_token)
    _W.update(options)


def _scan_file(args: tuple[str, str, str]) -> dict:
    path, text_key, txt_mode = args
    try:
        return count_and_hash(path, text_key, txt_mode)
    except CorruptInputError as e:
        return {"path": path, "error": str(e)}


def encode_chunk(raws: list[Any]) -> dict:
    """Parse, filter and tokenize one chunk; tokens come back flat with per-document sizes."""
    tok: Tokenizer = _W["tok"]
    include, exclude = _W["include"], _W["exclude"]
    texts, sets = [], []
    skipped: Counter = Counter()
    for raw in raws:
        text, set_name, reason = documents.parse_record(raw, _W["text_key"])
        if reason is not None:
            skipped[reason] += 1
        elif (include and set_name not in include) or (exclude and set_name in exclude):
            skipped[documents.FILTERED] += 1
        else:
            texts.append(text)
            sets.append(set_name)
    flat, sizes = tok.encode_flat(texts, tok.eod_id if _W["append_eod"] else None)
    per_set: dict[str, list[int]] = {}
    for name, n in zip(sets, sizes.tolist(), strict=True):
        slot = per_set.setdefault(name, [0, 0])
        slot[0] += 1
        slot[1] += n
    return {
        "tokens": np.asarray(flat, dtype=_W["dtype"]),
        "sizes": sizes,
        "skipped": dict(skipped),
        "sets": per_set,
    }


# ---------------------------------------------------------------- main side


def _record_bytes(raw: Any) -> int:
    return len(raw[0]) if isinstance(raw, tuple) and isinstance(raw[0], str) else (
        len(raw) if isinstance(raw, bytes) else 0)


def _chunks(records: Iterator[Any]) -> Iterator[tuple[list[Any], int]]:
    chunk, nbytes = [], 0
    for raw in records:
        chunk.append(raw)
        nbytes += _record_bytes(raw)
        if len(chunk) >= CHUNK_RECORDS or nbytes >= CHUNK_BYTES:
            yield chunk, nbytes
            chunk, nbytes = [], 0
    if chunk:
        yield chunk, nbytes


def _segment_records(segments: list[dict], text_key: str, txt_mode: str) -> Iterator[Any]:
    for seg in segments:
        yield from iter_segment(seg["path"], text_key, txt_mode, seg["start"], seg["stop"])


class _Runner:
    """Runs encode_chunk inline (one worker) or in a process pool, in order, with bounded lookahead."""

    def __init__(self, s: PrepSettings, dtype: np.dtype):
        options = {"text_key": s.text_key, "txt_mode": s.txt_mode, "append_eod": s.append_eod,
                   "dtype": dtype, "include": set(s.include_sets or ()), "exclude": set(s.exclude_sets or ())}
        self.workers = max(1, s.workers)
        self.pool = None
        self.progress = None
        if self.workers > 1:
            # spawn: workers start clean (no inherited threads or tokenizer pools) and are our children,
            # so their resource usage is accounted to this process.
            ctx = mp.get_context("spawn")
            self.progress = ctx.Queue()  # per-chunk counts from workers that write whole shards
            options["progress"] = self.progress
            with _single_threaded_blas():
                self.pool = ctx.Pool(self.workers, _init_worker, (s.tokenizer, s.eod_token, options, True))
        else:
            _init_worker(s.tokenizer, s.eod_token, options, False)

    def map_ordered(self, fn, items: Iterator[Any], lookahead: int | None = None) -> Iterator[tuple]:
        """(item's tag, fn(item's payload)) in input order; items are (payload, tag)."""
        if self.pool is None:
            for payload, tag in items:
                yield tag, fn(payload)
            return
        limit = lookahead or 2 * self.workers + 2
        pending: deque = deque()
        for payload, tag in items:
            pending.append((tag, self.pool.apply_async(fn, (payload,))))
            if len(pending) >= limit:
                tag0, res = pending.popleft()
                yield tag0, res.get()
        while pending:
            tag0, res = pending.popleft()
            yield tag0, res.get()

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


def _fingerprint(s: PrepSettings, tok: Tokenizer, files: list[Path]) -> str:
    stats = [(str(f.resolve()), *input_stamp(f)) for f in files]
    key = {
        "tokenizer": tok.identity, "files": stats, "text_key": s.text_key, "append_eod": s.append_eod,
        "include": sorted(s.include_sets or []), "exclude": sorted(s.exclude_sets or []),
        "max_documents": s.max_documents, "shards": s.shards, "txt_mode": s.txt_mode,
        "skip_bad_files": s.skip_bad_files, "nodes": [s.num_nodes, s.node_rank],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _shard_complete(state_file: Path, prefix: str, fingerprint: str) -> dict | None:
    """The saved result of a shard if it finished under the same settings and its files check out."""
    if not state_file.is_file():
        return None
    try:
        state = read_json(state_file)
        if state.get("fingerprint") != fingerprint:
            return None
        ds = MMapIndexedDataset(prefix)
        if len(ds) != state["documents"] or ds.n_tokens != state["tokens"]:
            return None
        if "max_token_id" not in state:  # finished by a version that did not record it
            state["max_token_id"] = int(ds.tokens.max()) if ds.n_tokens else -1
    except (OSError, ValueError, KeyError):
        return None
    return state


def _rates(docs: int, nbytes: int, tokens: int, seconds: float) -> dict:
    t = max(seconds, 1e-9)
    return {"docs_per_s": round(docs / t, 1), "mb_per_s": round(nbytes / t / 1e6, 3),
            "tokens_per_s": round(tokens / t, 1)}


def run_prep(s: PrepSettings) -> dict:
    """Run (or resume) a prep job; returns the manifest it wrote."""
    t0 = time.time()
    if s.shards < 1:
        raise ValueError(f"--shards must be at least 1, got {s.shards}")
    if s.max_documents is not None and s.max_documents < 0:
        raise ValueError(f"--max-documents must be >= 0, got {s.max_documents}")
    out_prefix = node_prefix(s.output_prefix, s.num_nodes, s.node_rank)
    man_path = manifest_path(out_prefix)
    check_writable_file(man_path, "the token shards and manifest (--output-prefix)")
    files = node_files(expand_inputs(s.inputs), s.num_nodes, s.node_rank)
    tok = load_tokenizer(s.tokenizer, eod_token=s.eod_token)
    dtype = best_dtype(tok.vocab_size)
    fingerprint = _fingerprint(s, tok, files)
    if man_path.is_file():
        try:
            old = read_json(man_path)
        except ValueError:
            old = {}
        if old.get("fingerprint") == fingerprint:
            _log(f"{man_path}: already complete for these inputs and settings; nothing to do")
            return old
    state_dir = Path(f"{out_prefix}.prep-state")
    state_dir.mkdir(parents=True, exist_ok=True)

    runner = _Runner(s, dtype)
    ok = False
    try:
        scans, bad_files = _scan(runner, files, s, state_dir)
        plan = plan_shards(scans, s.shards, s.max_documents)
        total_records = sum(seg["stop"] - seg["start"] for segs in plan for seg in segs)
        progress = _Progress(total_records, s.progress)
        results: dict[int, dict] = {}
        todo: dict[int, tuple] = {}
        for k, segs in enumerate(plan):
            prefix = shard_prefix(out_prefix, s.shards, k)
            state_file = state_dir / f"shard_{k:05d}.json"
            done = _shard_complete(state_file, prefix, fingerprint)
            if done is not None:
                results[k] = done
                progress.bar.update(done["records"])
            else:
                todo[k] = (segs, prefix, state_file, fingerprint)
        resumed = len(results)
        # With at least as many shards as workers, each worker makes whole shards, so no single
        # process reads everything; otherwise this process reads and the workers share each shard.
        if runner.pool is not None and s.shards >= runner.workers:
            results.update(_shards_in_parallel(runner, todo, progress))
        else:
            results.update(_shards_one_by_one(runner, todo, dtype, s, progress))
        results = [results[k] for k in range(len(plan))]
        progress.bar.close()
        ok = True
    finally:
        runner.close(ok)
    if sum(r["documents"] for r in results) == 0:
        _remove_empty_output(results, state_dir)
        raise NothingWrittenError(_nothing_written(files, scans, bad_files, results, s))
    seconds = time.time() - t0
    manifest = _manifest(s, tok, dtype, out_prefix, plan, scans, bad_files, results, fingerprint,
                         seconds, resumed)
    write_json_atomic(man_path, manifest)
    shutil.rmtree(state_dir, ignore_errors=True)
    _summary(manifest, man_path)
    return manifest


class NothingWrittenError(ValueError):
    """The inputs gave no document: an empty shard would only fail later, in training."""


def _nothing_written(files: list[Path], scans: list[dict], bad_files: list, results: list[dict],
                     s: PrepSettings) -> str:
    """Why no document came out, with the skip counts, for the one-line error."""
    if not files:
        return (f"no documents written: --node-rank {s.node_rank} of --num-nodes {s.num_nodes} got none of "
                "the input files; use fewer nodes than files")
    skipped: Counter = Counter()
    for r in results:
        skipped.update(r["skipped"])
    if bad_files:
        skipped["bad_file"] = len(bad_files)
    records = sum(r["records"] for r in results)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    if s.max_documents == 0:
        why = "--max-documents is 0"
    elif records == 0:
        why = f"the {len(files)} input file(s) hold no records"
    else:
        why = f"all {records} records read were skipped"
    return f"no documents written to {s.output_prefix}: {why} (skipped: {counts}); nothing to train on"


def _remove_empty_output(results: list[dict], state_dir: Path) -> None:
    """Leave no 0-document shard behind that a later run could take for a dataset."""
    for r in results:
        for suffix in (".bin", ".idx"):
            Path(f"{r['prefix']}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)


def _scan(runner: _Runner, files: list[Path], s: PrepSettings, state_dir: Path) -> tuple[list[dict], list]:
    """Record counts and checksums of every input (cached in the state dir for resumed runs)."""
    cache_file = state_dir / "scan.json"
    cache = read_json(cache_file) if cache_file.is_file() else {}
    keys = {str(f): "|".join(map(str, (f.resolve(), *input_stamp(f), s.text_key, s.txt_mode)))
            for f in files}
    todo = [str(f) for f in files if keys[str(f)] not in cache]
    if todo:
        from tqdm import tqdm  # here: workers, which import this module too, never show progress

        bar = tqdm(total=len(todo), unit="file", desc="scan", disable=not s.progress, file=sys.stderr)
        items = (((p, s.text_key, s.txt_mode), p) for p in todo)
        for path, res in runner.map_ordered(_scan_file, items, lookahead=max(runner.workers, 1)):
            cache[keys[path]] = res
            bar.update(1)
        bar.close()
        write_json_atomic(cache_file, cache)
    scans, bad_files = [], []
    for f in files:
        res = cache[keys[str(f)]]
        if "error" in res:
            if not s.skip_bad_files:
                raise _bad_file_error(res)
            _log(f"skipping bad file: {res['error']}")
            bad_files.append({"path": str(f), "error": res["error"]})
        else:
            scans.append(res)
    return scans, bad_files


def _bad_file_error(res: dict) -> ValueError:
    return ValueError(res["error"] + " (use --skip-bad-files to leave this file out and go on)")


def _fill_shard(results: Iterator[tuple[tuple[int, int], dict]], prefix: str, dtype: np.dtype,
                on_chunk) -> dict:
    """Append encoded chunks, in order, to a new shard; returns the shard's counts."""
    skipped: Counter = Counter()
    sets: dict[str, dict] = {}
    records = nbytes = 0
    max_id = -1
    writer = None
    try:
        writer = BinIdxWriter(prefix, dtype)
        for (n_rec, nb), res in results:
            writer.add_documents(res["tokens"], res["sizes"])
            if res["tokens"].size:
                max_id = max(max_id, int(res["tokens"].max()))
            skipped.update(res["skipped"])
            for name, (d, t) in res["sets"].items():
                slot = sets.setdefault(name, {"documents": 0, "tokens": 0})
                slot["documents"] += d
                slot["tokens"] += t
            records += n_rec
            nbytes += nb
            on_chunk(n_rec, nb, len(res["sizes"]), int(res["tokens"].size))
        writer.finish()
    except BaseException:  # Ctrl-C included: leave no .tmp behind
        if writer is not None:
            writer.abort()
        raise
    return {"prefix": prefix, "documents": writer.documents, "tokens": writer.tokens, "records": records,
            "max_token_id": max_id, "bytes": nbytes,
            "skipped": dict(sorted(skipped.items())), "pile_set_names": sets}


def _tagged_chunks(segs: list[dict], text_key: str, txt_mode: str) -> Iterator[tuple[list, tuple[int, int]]]:
    return ((chunk, (len(chunk), nb)) for chunk, nb in _chunks(_segment_records(segs, text_key, txt_mode)))


def _shard_job(args: tuple) -> dict:
    """Worker side of shard-parallel mode: read, encode and write one whole shard."""
    segs, prefix, state_file, fingerprint = args
    q = _W.get("progress")
    chunks = _tagged_chunks(segs, _W["text_key"], _W["txt_mode"])
    done = _fill_shard(((tag, encode_chunk(c)) for c, tag in chunks), prefix, _W["dtype"],
                       lambda *counts: q.put(counts) if q is not None else None)
    done.update(inputs=segs, fingerprint=fingerprint)
    write_json_atomic(state_file, done)
    return done


class _Progress:
    """The tokenize bar: records done, with docs/s, MB/s and tokens/s since the start."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="rec", desc="tokenize", disable=not enabled, file=sys.stderr,
                        smoothing=0.1)
        self.docs = self.bytes = self.tokens = 0
        self.t0 = time.time()

    def chunk(self, n_rec: int, nb: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.bytes += nb
        self.tokens += tokens
        self.bar.update(n_rec)
        r = _rates(self.docs, self.bytes, self.tokens, time.time() - self.t0)
        self.bar.set_postfix_str(f"{r['docs_per_s']:.0f} docs/s {r['mb_per_s']:.2f} MB/s "
                                 f"{r['tokens_per_s']:.0f} tok/s", refresh=False)


def _shards_one_by_one(runner: _Runner, todo: dict[int, tuple], dtype: np.dtype, s: PrepSettings,
                       progress: _Progress) -> dict[int, dict]:
    """Chunk-parallel mode: this process reads each shard in turn, the workers encode its chunks."""
    out = {}
    for k, (segs, prefix, state_file, fingerprint) in todo.items():
        items = _tagged_chunks(segs, s.text_key, s.txt_mode)
        done = _fill_shard(runner.map_ordered(encode_chunk, items), prefix, dtype, progress.chunk)
        done.update(inputs=segs, fingerprint=fingerprint)
        write_json_atomic(state_file, done)
        out[k] = done
    return out


def _shards_in_parallel(runner: _Runner, todo: dict[int, tuple], progress: _Progress) -> dict[int, dict]:
    """Shard-parallel mode: each worker reads, encodes and writes whole shards; no single reader."""
    pending = {k: runner.pool.apply_async(_shard_job, (args,)) for k, args in todo.items()}
    out: dict[int, dict] = {}
    while pending:
        try:
            progress.chunk(*runner.progress.get(timeout=0.2))
        except queue.Empty:
            pass
        for k in [k for k, r in pending.items() if r.ready()]:
            out[k] = pending.pop(k).get()  # re-raises a worker's error here
    while True:  # counts still queued after the last shard finished
        try:
            progress.chunk(*runner.progress.get(timeout=0.05))
        except queue.Empty:
            break
    return out


def _manifest(s, tok, dtype, out_prefix, plan, scans, bad_files, results, fingerprint, seconds,
              resumed) -> dict:
    man_dir = manifest_path(out_prefix).resolve().parent
    skipped: Counter = Counter()
    sets: dict[str, dict] = {}
    for r in results:
        skipped.update(r["skipped"])
        for name, c in r["pile_set_names"].items():
            slot = sets.setdefault(name, {"documents": 0, "tokens": 0})
            slot["documents"] += c["documents"]
            slot["tokens"] += c["tokens"]
    if bad_files:
        skipped["bad_file"] = len(bad_files)
    docs = sum(r["documents"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    max_id = max(r["max_token_id"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    settings = asdict(s)
    settings.pop("progress")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.describe(),
        "dtype": np.dtype(dtype).name,
        "append_eod": s.append_eod,
        "documents": docs,
        "tokens": tokens,
        "max_token_id": max_id,  # checked against the model's vocabulary before training
        "shards": [
            {"prefix": os.path.relpath(Path(r["prefix"]).resolve(), man_dir), "documents": r["documents"],
             "tokens": r["tokens"], "max_token_id": r["max_token_id"], "records": r["records"],
             "inputs": r["inputs"]}
            for r in results
        ],
        "inputs": [{"path": x["path"], "bytes": x["bytes"], "sha256": x["sha256"], "records": x["records"],
                    **({"source": x["source"]} if "source" in x else {})}  # datasets: name, split, version
                   for x in scans],
        "pile_set_names": dict(sorted(sets.items())),
        "skipped": dict(sorted(skipped.items())),
        "bad_files": bad_files,
        "settings": settings,
        "fingerprint": fingerprint,
        "timings": {"seconds": round(seconds, 3), "resumed_shards": resumed,
                    **_rates(docs, nbytes, tokens, seconds)},
    }


def _log(msg: str) -> None:
    print(f"data_prep: {msg}", file=sys.stderr, flush=True)


def _summary(m: dict, path: Path) -> None:
    t = m["timings"]
    lines = [
        f"wrote {len(m['shards'])} shard(s), {m['documents']} documents, {m['tokens']} tokens "
        f"({m['dtype']}) in {t['seconds']:.1f} s: {t['docs_per_s']:.0f} docs/s, {t['mb_per_s']:.2f} MB/s, "
        f"{t['tokens_per_s']:.0f} tokens/s" + (f"; {t['resumed_shards']} shard(s) kept from an earlier run"
                                              if t["resumed_shards"] else ""),
        "skipped: " + (", ".join(f"{k}={v}" for k, v in m["skipped"].items()) or "none"),
    ]
    lines += [f"bad file: {b['error']}" for b in m["bad_files"]]
    lines.append(f"manifest: {path}")
    for line in lines:
        _log(line)
