"""A faster, exact encoder for sentencepiece unigram and BPE models: segmentations cached per chunk.

sentencepiece encodes a text as: normalize the whole text (user-defined symbols kept as they are,
the normalization rule, dummy prefix, whitespace collapsing, spaces escaped as '▁'), then segment
the whole normalized string at once. It does not itself cut at whitespace; the cut is only implied
by the vocabulary. When no piece has a '▁' after a non-'▁' character (trained with
split_by_whitespace, with or without allow_whitespace_only_pieces), no piece can span a position
where a '▁' follows a non-'▁', so every segmentation breaks there and the string falls into chunks
("▁▁▁word", "\\nfoo", ...) that can be segmented once and remembered.

`data_prep/csrc/sentencepiece_exact.cpp` does the work in C++ (built on first use, see
`data_prep.native`): sentencepiece's normalizer, the cut, the cache, and for unigram models a replica
of sentencepiece's Viterbi, since a unigram chunk's segmentation can depend, through float32
rounding, on the score the text arrives with (the C++ file explains when a cached path is provably
the one sentencepiece would pick, and re-segments the chunk otherwise). BPE chunks are independent
of their context (a merge across a cut would make a piece that is not in the vocabulary, and merges
within a chunk happen in the same order as in the whole text), so new BPE chunks are encoded by
sentencepiece itself (the same model with a no-op normalizer) and their ids are final.

Models it cannot reason about (treat_whitespace_as_suffix, whitespace not escaped, a piece with '▁'
inside, no usable '▁' piece, other model types) get no cache: `for_processor` returns None, and so it
does when the helper cannot be built or does not agree with the installed sentencepiece on a probe
set of texts made from the model's own pieces (a guard against a future change of its algorithm).
"""

from __future__ import annotations

import ctypes
import itertools
import random
import re
import sys
from itertools import chain
from typing import Any

import numpy as np

from data_prep import native

WS = "\u2581"  # sentencepiece's escaped space
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType
NORMAL, UNKNOWN, USER_DEFINED, UNUSED = 1, 2, 4, 5  # ModelProto.SentencePiece.Type
# Piece types that the segmenter can emit from text.
_TEXT_PIECE_TYPES = {NORMAL, USER_DEFINED, UNUSED}
# The unigram Viterbi the C++ file replicates (float32 scores re-based beyond 1e5) is sentencepiece's
# since this version; with older ones unigram models take the plain path.
UNIGRAM_SINCE = (0, 2, 3)
# Bound on remembered chunks: memory stays flat however large the corpus.
MAX_CACHED_CHUNKS = 1_000_000
_LIBRARY = "sentencepiece_exact"


def _model_proto(sp: Any) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    return m


def cuts_are_safe(m: Any) -> bool:
    """True when no piece can span a '▁' that follows a non-'▁' character."""
    return not any(p.type in _TEXT_PIECE_TYPES and WS in p.piece.lstrip(WS) for p in m.pieces)


def _chunk_processor(m: Any) -> Any:
    """The same model with a no-op normalizer, to segment already-normalized chunks as they are."""
    import sentencepiece as spm

    m.normalizer_spec.name = "identity"
    m.normalizer_spec.precompiled_charsmap = b""
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def supported(m: Any) -> bool:
    t, n = m.trainer_spec, m.normalizer_spec
    # A run of unknown characters becomes one <unk> (without byte fallback), and a unigram chunk's
    # first piece must not be one: '▁' has to be a piece the segmenter can emit on its own.
    ws_types = {NORMAL, USER_DEFINED} if t.model_type == UNIGRAM else _TEXT_PIECE_TYPES
    ws_known = any(p.piece == WS and p.type in ws_types for p in m.pieces)
    return (t.model_type in (UNIGRAM, BPE) and not t.treat_whitespace_as_suffix and n.escape_whitespaces
            and ws_known and cuts_are_safe(m) and any(p.type == UNKNOWN for p in m.pieces))


def _sentencepiece_version() -> tuple[int, ...]:
    import sentencepiece as spm

    return tuple(int(x) for x in re.findall(r"\d+", spm.__version__)[:3])


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    signatures = {
        "spx_new": (p, [i32, i32, i32, p, p, p, p, i32, p, i64, i64]),
        "spx_free": (None, [p]),
        "spx_encode": (i64, [p, p, p, i32, i32]),
        "spx_missing_bytes": (i64, [p]),
        "spx_missing": (None, [p, p, p]),
        "spx_add_and_assemble": (i64, [p, p, p]),
        "spx_output": (None, [p, p, p]),
        "spx_set_use_cache": (None, [p, i32]),
        "spx_normalize": (i64, [p, p, i64]),
        "spx_normalized": (None, [p, p]),
        "spx_cached_chunks": (i64, [p]),
        "spx_replica_chunks": (i64, [p]),
    }
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


class SentencePieceChunkCache:
    """`encode(text)` gives sentencepiece's ids for `text` (same as `sp.encode(text)`)."""

    def __init__(self, lib: ctypes.CDLL, m: Any, sp: Any):
        self._lib = lib
        self._sp = sp
        self.model_type = "unigram" if m.trainer_spec.model_type == UNIGRAM else "bpe"
        pieces = [p.piece.encode("utf-8") for p in m.pieces]
        offsets = _offsets([len(b) for b in pieces])
        scores = np.array([p.score for p in m.pieces], dtype=np.float32)
        types = np.array([p.type for p in m.pieces], dtype=np.int32)
        n = m.normalizer_spec
        flags = n.add_dummy_prefix | (n.remove_extra_whitespaces << 1) | (m.trainer_spec.byte_fallback << 2)
        unk = next(i for i, p in enumerate(m.pieces) if p.type == UNKNOWN)
        blob, charsmap = b"".join(pieces), bytes(n.precompiled_charsmap)
        self._handle = lib.spx_new(m.trainer_spec.model_type, flags, unk, blob, _ptr(offsets), _ptr(scores),
                                   _ptr(types), len(pieces), charsmap, len(charsmap), MAX_CACHED_CHUNKS)
        if not self._handle:
            raise ValueError("the model's tables or normalization rule could not be read")
        # BPE only: new chunks are segmented by sentencepiece itself, without normalizing them again.
        self._chunk_sp = _chunk_processor(m) if self.model_type == "bpe" else None

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.spx_free(self._handle)
            self._handle = None

    @classmethod
    def for_processor(cls, sp: Any) -> SentencePieceChunkCache | None:
        m = _model_proto(sp)
        too_old = m.trainer_spec.model_type == UNIGRAM and _sentencepiece_version() < UNIGRAM_SINCE
        if too_old or not supported(m):
            return None
        lib = native.load_library(_LIBRARY)
        if lib is None:
            return None
        _declare(lib)
        try:
            cache = cls(lib, m, sp)
        except ValueError as e:
            print(f"data_prep: sentencepiece fast path off ({e})", file=sys.stderr)
            return None
        probes = probe_texts(m)
        if cache.encode_batch(probes) != sp.encode(probes):
            print("data_prep: the sentencepiece fast path disagrees with this sentencepiece version on a "
                  "probe text; using sentencepiece's own encode", file=sys.stderr)
            return None
        return cache

    def encode_flat(self, texts: list[str], eod: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids in one int32 array (each followed by `eod` if >= 0), and each text's count."""
        raw = [t.encode("utf-8") for t in texts]  # lone surrogates raise here, as in sentencepiece
        lib, h = self._lib, self._handle
        offsets = _offsets([len(b) for b in raw])
        n = lib.spx_encode(h, b"".join(raw), _ptr(offsets), len(raw), eod)
        if n < 0:
            blob = ctypes.create_string_buffer(max(1, lib.spx_missing_bytes(h)))
            bounds = np.empty(-n + 1, dtype=np.int64)
            lib.spx_missing(h, blob, _ptr(bounds))
            data = blob.raw
            chunks = [data[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds.tolist())]
            # One C++ call for all new chunks; one thread (sentencepiece's default for a list is a thread
            # per core, which only adds overhead in a pipeline worker).
            ids = self._chunk_sp.encode(chunks, num_threads=1)
            flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32)
            flat_offsets = _offsets([len(x) for x in ids])  # named: it must outlive the call
            n = lib.spx_add_and_assemble(h, _ptr(flat), _ptr(flat_offsets))
        out = np.empty(n, dtype=np.int32)
        sizes = np.empty(len(raw), dtype=np.int64)
        lib.spx_output(h, _ptr(out), _ptr(sizes))
        return out, sizes

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ids, sizes = self.encode_flat(texts)
        return [a.tolist() for a in np.split(ids, np.cumsum(sizes)[:-1])] if texts else []

    def encode(self, text: str) -> list[int]:
        return self.encode_flat([text])[0].tolist()

    def cached_chunks(self) -> int:
        return self._lib.spx_cached_chunks(self._handle)

    def replica_chunks(self) -> int:
        """Unigram chunks segmented from their context's score rather than taken from the cache."""
        return self._lib.spx_replica_chunks(self._handle)

    def use_cache(self, mode: int) -> None:
        """For tests: 1 as usual; 0 segments every unigram chunk with the Viterbi replica; 2 trusts every
        cached unigram path, whatever score the text arrives with (not exact)."""
        self._lib.spx_set_use_cache(self._handle, mode)

    def normalize(self, text: str) -> str:
        """The C++ normalizer's output (what `sp.normalize(text)` gives)."""
        raw = text.encode("utf-8")
        size = self._lib.spx_normalize(self._handle, raw, len(raw))
        out = ctypes.create_string_buffer(max(1, size))
        self._lib.spx_normalized(self._handle, out)
        return out.raw[:size].decode("utf-8")


def probe_texts(m: Any, n: int = 48, seed: int = 0) -> list[str]:
    """Short texts of the model's own pieces, spaces, newlines and an unknown character."""
    rng = random.Random(seed)
    pieces = [p.piece.replace(WS, " ") for p in m.pieces if p.type in (NORMAL, USER_DEFINED)] or ["a"]
    extra = [" ", "  ", "\n", "\t", "\u3000", "\x00", "é", "😀", WS, "12", ".,"]
    def one() -> str:
        return "".join(rng.choice(pieces) if rng.random() < 0.8 else rng.choice(extra)
                       for _ in range(rng.randint(1, 24)))

    return ["", " ", "  a  b  "] + [one() for _ in range(n)]
