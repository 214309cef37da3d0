"""A faster, exact encoder for sentencepiece BPE models: ids cached per whitespace-delimited chunk.

sentencepiece encodes a text as: normalize the whole text (normalization rule, dummy prefix,
whitespace collapsing, spaces escaped as '▁'), then segment the whole normalized string at once.
It does not itself cut at whitespace; the cut is only implied by the vocabulary. When no piece
has a '▁' after a non-'▁' character (trained with split_by_whitespace, with or without
allow_whitespace_only_pieces), no piece can span a position where a '▁' follows a non-'▁', so
every segmentation breaks there and the string falls into independent chunks ("▁▁▁word",
"\\nfoo", ...). This encoder normalizes with the model's own normalizer
(`SentencePieceProcessor.normalize`), cuts at those positions and keeps chunk -> ids in a dict,
asking sentencepiece (the same model, with a no-op normalizer) only for chunks it has not seen.

Why it is exact for BPE: a merge across a cut would make a piece that is not in the vocabulary,
so merges never cross it; within a chunk, merges happen in the same order (best score, then
leftmost) as in the whole text, and the unused-piece resegmentation and byte fallback act on one
piece at a time. Scores are compared, never summed.

Unigram models get no cache, for two reasons. Speed: sentencepiece's unigram Viterbi runs at
~17 MB/s per core on the demo model, and normalizing plus cutting the text in Python alone costs
as much. Exactness: the Viterbi pass sums piece scores in float32 from the start of the text, so
a chunk's best path is computed from the rounded score of everything before it and a near tie
far into a long document can, in principle, resolve differently than in the chunk alone (a
guard against that, on the gap to the second-best segmentation, declined 69% of the demo
corpus's documents).

Models it cannot reason about (unigram, treat_whitespace_as_suffix, whitespace not escaped, a
piece with '▁' inside) get no cache: `for_processor` returns None.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Any

WS = "\u2581"  # sentencepiece's escaped space
# A cut before every '▁' that follows something other than '▁'.
_CHUNK = re.compile(rf"{WS}*[^{WS}]+|{WS}+")
BPE = 2  # TrainerSpec.ModelType
# Piece types that the segmenter can emit from text (NORMAL, USER_DEFINED, UNUSED).
_TEXT_PIECE_TYPES = {1, 4, 5}
# Bound on remembered chunks: memory stays flat however large the corpus.
MAX_CACHED_CHUNKS = 1_000_000


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
    # sentencepiece merges a run of unknown characters into one <unk>: with '▁' a known piece, no
    # such run can span a cut (each cut is right before a '▁'). Cutting anywhere else (around an
    # unknown character, say) would split such runs, and the tests catch it.
    ws_known = any(p.piece == WS and p.type in _TEXT_PIECE_TYPES for p in m.pieces)
    return (t.model_type == BPE and not t.treat_whitespace_as_suffix and n.escape_whitespaces
            and ws_known and cuts_are_safe(m))


class SentencePieceChunkCache:
    """`encode(text)` gives sentencepiece's ids for `text` (same as `sp.encode(text)`)."""

    def __init__(self, sp: Any, chunk_sp: Any):
        self._normalize = sp.normalize
        self._chunk_sp = chunk_sp
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_processor(cls, sp: Any) -> SentencePieceChunkCache | None:
        if not hasattr(sp, "normalize"):  # sentencepiece < 0.1.99: no access to its normalizer
            return None
        m = _model_proto(sp)
        return cls(sp, _chunk_processor(m)) if supported(m) else None

    def encode(self, text: str) -> list[int]:
        chunks = _CHUNK.findall(self._normalize(text))
        cache = self._cache
        try:
            # The common case, every chunk seen before, in one pass without Python-level branching.
            return list(chain.from_iterable(map(cache.__getitem__, chunks)))
        except KeyError:
            pass
        self._add(list(dict.fromkeys(chunks)))
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def _add(self, chunks: list[str]) -> None:
        """Caches this document's distinct chunks that are not cached yet."""
        new = [c for c in chunks if c not in self._cache]
        if len(self._cache) + len(new) > MAX_CACHED_CHUNKS:
            # Emptied before, not while, adding: the document needs all of its chunks at once.
            self._cache.clear()
            new = chunks
        # One C++ call for all of a document's new chunks; one thread (sentencepiece's default for
        # a list is a thread per core, which only adds overhead in a pipeline worker). The id
        # lists are stored as they come and never handed out: `encode` copies them.
        self._cache.update(zip(new, self._chunk_sp.encode(new, num_threads=1), strict=True))
