"""Tokenizers behind one small interface: HF `tokenizer.json`, sentencepiece `.model`, `rwkv-world`.

`load_tokenizer(spec)` picks the kind from the spec. Every tokenizer exposes
`encode`, `encode_batch` (the fast path the pipeline uses), `decode`,
`vocab_size`, `eod_id` (appended after each document) and `identity`
(a hash of the vocabulary file, recorded in manifests so that shards made with
different vocabularies are never mixed).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from itertools import chain
from pathlib import Path

import numpy as np

from data_prep.sentencepiece_cache import SentencePieceChunkCache

WORLD_SPEC = "rwkv-world"
# RWKV World models have 65536 embedding rows; the vocabulary file fills ids 1..65529.
WORLD_VOCAB_SIZE = 65536
# End-of-document tokens tried, in order, when a HF tokenizer.json is given.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def _file_identity(kind: str, path: Path) -> str:
    h = hashlib.sha256(kind.encode() + b"\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{kind}:sha256:{h.hexdigest()}"


class Tokenizer:
    """Common interface; subclasses fill `kind`, `spec`, `vocab_size`, `eod_id`, `identity`."""

    kind: str
    spec: str
    vocab_size: int
    eod_id: int
    identity: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: list[str], eod: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids in one array, each text followed by `eod` unless it is None, and each text's
        count (eod included): what the pipeline writes, without a Python list per document."""
        tail = [] if eod is None else [eod]
        ids = self.encode_batch(texts)
        flat = np.fromiter(chain.from_iterable(chain(x, tail) for x in ids), dtype=np.int64)
        sizes = np.fromiter((len(x) + len(tail) for x in ids), dtype=np.int64, count=len(ids))
        return flat, sizes

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "identity": self.identity,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
        }


class HFTokenizer(Tokenizer):
    """A `tokenizers` JSON file, e.g. GPT-NeoX-20B's (the Pile standard, `<|endoftext|>` = 0)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        self.spec = str(path)
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable HF tokenizer.json ({e})") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eod_token,) if eod_token else HF_EOD_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"{path}: no end-of-document token among {list(candidates)}; name one with --eod-token"
            )
        self.eod_id = found[0]
        self.identity = _file_identity(self.kind, self.path)
        from data_prep.bytelevel_bpe import ByteLevelPieceEncoder  # with `regex`, only where it is used

        self._pieces = ByteLevelPieceEncoder.for_tokenizer(self._tok)  # None unless byte-level BPE

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(texts)
        if self._pieces is not None:
            out = [self._pieces.encode(t) for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            # encode_batch_fast (tokenizers >= 0.21) gives the same ids without computing offsets.
            fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            for i, e in zip(rest, fast([texts[i] for i in rest], add_special_tokens=False), strict=True):
                out[i] = e.ids
        return out  # type: ignore[return-value]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; its EOS piece is the end-of-document token."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        self.spec = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from e
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"{path}: sentencepiece model has no EOS piece to use as end-of-document")
        self.identity = _file_identity(self.kind, self.path)
        # An exact chunk cache for unigram and BPE models that split at whitespace (see
        # sentencepiece_cache); None for the others.
        self._chunks = SentencePieceChunkCache.for_processor(self._sp)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._chunks is not None:
            return self._chunks.encode_batch(texts)
        # One C++ call for the whole batch; threads stay at 1 since the pipeline runs one per process.
        return self._sp.encode(texts, num_threads=1)

    def encode_flat(self, texts: list[str], eod: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self._chunks is not None:
            return self._chunks.encode_flat(texts, -1 if eod is None else eod)
        return super().encode_flat(texts, eod)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def world_vocab_path() -> Path:
    import rwkv

    return Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"


def _world_pieces(path: Path) -> dict[int, bytes]:
    """id -> bytes from the vocabulary file (lines: `ID REPR(str or bytes) BYTE_LENGTH`)."""
    pieces = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        idx, rest = line.split(" ", 1)
        literal, length = rest.rsplit(" ", 1)
        piece = ast.literal_eval(literal)
        piece = piece.encode("utf-8") if isinstance(piece, str) else piece
        if len(piece) != int(length):
            raise ValueError(f"{path}:{n}: piece length {len(piece)} != {length}")
        pieces[int(idx)] = piece
    return pieces


class WorldTokenizer(Tokenizer):
    """RWKV World vocabulary (`rwkv_vocab_v20230424`), greedy longest byte match; id 0 ends a document.

    Encodes with `pyrwkv_tokenizer` (Rust) when it is installed, else with the `rwkv` package's
    pure-Python trie; both give the same ids, the Rust one about ten times faster.
    """

    kind = "rwkv-world"

    def __init__(self):
        path = world_vocab_path()
        self.spec = WORLD_SPEC
        self._path = path
        self._encoder = None  # built on first encode: the process that only writes files never needs it
        self._pieces: dict[int, bytes] | None = None  # read on first decode
        self.vocab_size = WORLD_VOCAB_SIZE
        self.eod_id = 0
        self.identity = _file_identity(self.kind, path)

    def _encoder_obj(self):
        if self._encoder is None:
            try:
                from pyrwkv_tokenizer import WorldTokenizer as _Rust

                self._encoder = _Rust(str(self._path))
            except ImportError:
                from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

                self._encoder = TRIE_TOKENIZER(str(self._path))
        return self._encoder

    @property
    def backend(self) -> str:
        trie = type(self._encoder_obj()).__name__ == "TRIE_TOKENIZER"
        return "rwkv.rwkv_tokenizer" if trie else "pyrwkv_tokenizer"

    def encode(self, text: str) -> list[int]:
        return self._encoder_obj().encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        enc = self._encoder_obj()
        if hasattr(enc, "encode_batch"):
            return enc.encode_batch(texts)
        return [enc.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        if self._pieces is None:
            self._pieces = _world_pieces(self._path)
        # Id 0 has no bytes in the vocabulary: it only marks a document's end.
        return b"".join(self._pieces.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")


@functools.cache
def _world_tokenizer() -> WorldTokenizer:
    # Building the vocabulary trie takes seconds; the tokenizer holds no per-call state.
    return WorldTokenizer()


def load_tokenizer(spec: str | os.PathLike, eod_token: str | None = None) -> Tokenizer:
    """`rwkv-world`, a sentencepiece `.model`, or a HF `tokenizer.json` (any other `.json`)."""
    spec_s = str(spec)
    if spec_s == WORLD_SPEC:
        return _world_tokenizer()
    path = Path(spec_s)
    if not path.is_file():
        raise FileNotFoundError(f"{spec_s}: tokenizer file not found (expected a tokenizer.json, "
                                f"a sentencepiece .model, or '{WORLD_SPEC}')")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path, eod_token=eod_token)
    raise ValueError(f"{spec_s}: unknown tokenizer kind (expected .json, .model or '{WORLD_SPEC}')")
