"""Prep throughput: our pipeline against the GPT-NeoX way, same corpus, tokenizer and worker count, one run.

The GPT-NeoX way (`tools/preprocess_data.py`): the main process reads and parses
the JSON lines, a `multiprocessing.Pool` encodes one document per call
(`imap(encoder.encode, docs, chunksize=25)`), and the main process writes each
document with the MMIDIDX builder. Both runs must write identical tokens.

    python bench/prep.py                      # HF byte-level BPE, 2 workers, demo corpus x4
    python bench/prep.py --tokenizer sp --repeat 8 --workers 2
    python bench/prep.py --tokenizer sp sp-bpe --repeat 3   # sentencepiece unigram and BPE

Also measures peak memory (resident memory of the main process, and of the largest worker) of our
pipeline on the corpus x1 and x`--repeat`, to show that memory does not grow with input size.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = [REPO / "data/demo/train/00.jsonl.zst", REPO / "data/demo/train/01.jsonl.zst"]


# ---------------------------------------------------------------- the GPT-NeoX way

class NeoxEncoder:
    """GPT-NeoX's Encoder, with the tokenizer classes its tools use for each kind: `tokenizers`
    (HFTokenizer), `sentencepiece` (SentencePieceTokenizer), and for the RWKV World vocabulary the
    pure-Python trie that RWKV's json2binidx tool (GPT-NeoX's preprocess_data.py) ships."""

    def __init__(self, spec: str, eod: int):
        self.spec, self.eod = spec, eod

    def initializer(self) -> None:
        if self.spec == "rwkv-world":
            from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

            from data_prep.tokenizer import world_vocab_path

            trie = TRIE_TOKENIZER(str(world_vocab_path()))
            NeoxEncoder.tokenize = staticmethod(trie.encode)
        elif self.spec.endswith(".model"):
            import sentencepiece as spm

            NeoxEncoder.tokenize = staticmethod(spm.SentencePieceProcessor(model_file=self.spec).encode)
        else:
            from tokenizers import Tokenizer

            hf = Tokenizer.from_file(self.spec)
            NeoxEncoder.tokenize = staticmethod(lambda text: hf.encode(text).ids)

    def encode(self, text: str) -> tuple[list[list[int]], int]:
        ids = NeoxEncoder.tokenize(text)
        doc_ids = [ids] if ids else []
        if doc_ids:
            doc_ids[-1].append(self.eod)
        return doc_ids, len(text)


def neox_yield_texts(paths: list[str]):
    for p in paths:
        with open(p, "rb") as f:
            reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
            for line in reader:
                if line.strip():
                    yield json.loads(line)["text"]


def neox_prep(paths: list[str], spec: str, prefix: str, workers: int) -> None:
    from data_prep.binidx import best_dtype, write_index
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    dtype = best_dtype(tok.vocab_size)
    enc = NeoxEncoder(spec, tok.eod_id)
    pool = mp.get_context("fork").Pool(workers, initializer=enc.initializer)
    sizes, doc_idx = [], [0]
    with open(f"{prefix}.bin", "wb") as out:
        for doc, _ in pool.imap(enc.encode, neox_yield_texts(paths), 25):
            for sentence in doc:
                arr = np.array(sentence, dtype=dtype)
                out.write(arr.tobytes(order="C"))
                sizes.append(arr.size)
            doc_idx.append(len(sizes))
    pool.close()
    pool.join()
    write_index(Path(f"{prefix}.idx"), dtype, np.array(sizes, dtype=np.int64), np.array(doc_idx))


# ---------------------------------------------------------------- one measured job (own process)

def _rss_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class ChildRSS:
    """Samples the resident memory of this process's children (the workers) every 50 ms.

    getrusage's ru_maxrss would not do: Linux carries it across fork and exec, so it would
    include the memory of whichever process started the job.
    """

    def __init__(self):
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.05):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = f.read().rsplit(")", 1)[1].split()[1]
                except OSError:
                    continue
                if ppid == me:
                    self.peak_kb = max(self.peak_kb, _rss_kb(pid, "VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def job(kind: str, paths: list[str], spec: str, prefix: str, workers: int) -> None:
    children = ChildRSS()
    t0 = time.perf_counter()
    if kind == "neox":
        neox_prep(paths, spec, prefix, workers)
    else:
        from data_prep.pipeline import PrepSettings, run_prep

        # "ours": one output file, this process reads and the workers encode chunks;
        # "ours_sharded": one shard per worker, each worker reads, encodes and writes its own.
        shards = workers if kind == "ours_sharded" else 1
        run_prep(PrepSettings(inputs=paths, tokenizer=spec, output_prefix=prefix, workers=workers,
                              shards=shards, progress=False))
    seconds = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "main_cpu_seconds": me.ru_utime + me.ru_stime,
        "rss_main_mb": _rss_kb("self", "VmHWM") / 1024,  # high-water mark of this process since exec
        "rss_worker_mb": children.stop() / 1024,
    }))


def run_job(kind: str, paths: list[str], spec: str, prefix: str, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--_job", kind, "--_prefix", prefix, "--workers", str(workers),
           "--_spec", spec, "--_inputs", *paths]
    from data_prep import BLAS_THREAD_VARS

    # As `python -m data_prep` runs (see data_prep/__main__.py), for both ways alike: no BLAS thread pool.
    env = {**os.environ, **{v: os.environ.get(v, "1") for v in BLAS_THREAD_VARS}}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} job failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- corpus and tokenizers

def build_corpus(tmp: Path, repeat: int) -> tuple[list[str], dict]:
    """The demo corpus repeated `repeat` times, as 2 x `repeat` .jsonl.zst files; returns paths and totals."""
    lines = []
    for p in DEMO:
        with open(p, "rb") as f:
            data = zstandard.ZstdDecompressor().decompressobj().decompress(f.read())
        lines.append([ln for ln in data.splitlines() if ln.strip()])
    paths, docs, text_bytes = [], 0, 0
    cctx = zstandard.ZstdCompressor(level=3)
    for r in range(repeat):
        for i, part in enumerate(lines):
            path = tmp / f"{r:02d}_{i}.jsonl.zst"
            path.write_bytes(cctx.compress(b"\n".join(part) + b"\n"))
            paths.append(str(path))
            docs += len(part)
            text_bytes += sum(len(json.loads(ln)["text"].encode()) for ln in part)
    return paths, {"docs": docs, "text_bytes": text_bytes}


def build_tokenizer(kind: str, tmp: Path) -> str:
    if kind == "world":
        return "rwkv-world"
    if kind in ("sp", "sp-bpe"):
        from data_prep.train_tokenizer import train_sentencepiece

        # "sp" is unigram (sentencepiece's default), "sp-bpe" BPE; both take our exact chunk cache.
        model_type = "bpe" if kind == "sp-bpe" else "unigram"
        return str(train_sentencepiece([str(p) for p in DEMO], str(tmp / kind), vocab_size=2048,
                                       model_type=model_type, max_sentences=50_000))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for t in neox_yield_texts([str(p) for p in DEMO])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(tmp / "tokenizer.json"))
    return str(tmp / "tokenizer.json")


def rates(res: dict, totals: dict, tokens: int) -> str:
    s, mb = res["seconds"], totals["text_bytes"] / 1e6
    # The main process reads, hands out and writes everything: its CPU time bounds throughput
    # however many workers a node adds.
    ceiling = mb / max(res["main_cpu_seconds"], 1e-9)
    return (f"{s:6.2f} s | {totals['docs'] / s:6.0f} docs/s | {mb / s:6.2f} MB/s | {tokens / s:9.0f} tokens/s"
            f" | CPU {res['cpu_seconds']:.2f} s, main process {res['main_cpu_seconds']:.2f} s "
            f"(ceiling {ceiling:.0f} MB/s) | peak RSS main {res['rss_main_mb']:.0f} MB, "
            f"worker {res['rss_worker_mb']:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", nargs="+", choices=("world", "hf", "sp", "sp-bpe"),
                    default=["world", "hf", "sp", "sp-bpe"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=6, help="copies of the demo corpus in the large input")
    ap.add_argument("--_job")
    ap.add_argument("--_prefix")
    ap.add_argument("--_spec")
    ap.add_argument("--_inputs", nargs="*")
    a = ap.parse_args()
    if a._job:
        return job(a._job, a._inputs, a._spec, a._prefix, a.workers)

    from data_prep.binidx import MMapIndexedDataset

    with tempfile.TemporaryDirectory(prefix="bench_prep_") as d:
        tmp = Path(d)
        (tmp / "x1").mkdir()
        (tmp / "xN").mkdir()
        small, small_totals = build_corpus(tmp / "x1", 1)
        large, totals = build_corpus(tmp / "xN", a.repeat)
        print(f"corpus: demo x{a.repeat}: {len(large)} files, {totals['docs']} documents, "
              f"{totals['text_bytes'] / 1e6:.1f} MB of text; {a.workers} workers; {os.cpu_count()} CPUs")
        ok = True
        for i, kind in enumerate(a.tokenizer):
            spec = build_tokenizer(kind, tmp)
            neox = run_job("neox", large, spec, str(tmp / f"neox_{kind}"), a.workers)
            ours = run_job("ours", large, spec, str(tmp / f"ours_{kind}"), a.workers)
            same = all((tmp / f"neox_{kind}{ext}").read_bytes() == (tmp / f"ours_{kind}{ext}").read_bytes()
                       for ext in (".bin", ".idx"))
            ok &= same
            tokens = MMapIndexedDataset(tmp / f"ours_{kind}").n_tokens
            print(f"\ntokenizer {kind} ({spec}):")
            print(f"  gpt-neox way: {rates(neox, totals, tokens)}")
            print(f"  ours:         {rates(ours, totals, tokens)}")
            print(f"  identical .bin/.idx: {same}")
            print(f"  speedup (ours / gpt-neox), wall: {neox['seconds'] / ours['seconds']:.2f}x, "
                  f"CPU: {neox['cpu_seconds'] / ours['cpu_seconds']:.2f}x")
            sharded = run_job("ours_sharded", large, spec, str(tmp / f"sharded_{kind}"), a.workers)
            parts = b"".join((tmp / f"sharded_{kind}_{k:05d}.bin").read_bytes() for k in range(a.workers))
            same_tokens = parts == (tmp / f"neox_{kind}.bin").read_bytes()
            ok &= same_tokens
            print(f"  ours, {a.workers} shards (a worker per shard): {rates(sharded, totals, tokens)}")
            print(f"  same tokens as gpt-neox: {same_tokens}; speedup wall: "
                  f"{neox['seconds'] / sharded['seconds']:.2f}x, "
                  f"CPU: {neox['cpu_seconds'] / sharded['cpu_seconds']:.2f}x")
            if i == 0:
                res = run_job("ours", small, spec, str(tmp / "ours_x1"), a.workers)
                small_tokens = MMapIndexedDataset(tmp / "ours_x1").n_tokens
                print(f"  ours, x1 input: {rates(res, small_totals, small_tokens)}")
                print(f"  peak memory x1 -> x{a.repeat}: main {res['rss_main_mb']:.0f} -> "
                      f"{ours['rss_main_mb']:.0f} MB, worker {res['rss_worker_mb']:.0f} -> "
                      f"{ours['rss_worker_mb']:.0f} MB")
        if not ok:
            raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
