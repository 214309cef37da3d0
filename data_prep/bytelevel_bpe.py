"""A faster, exact encoder for mostly-Latin documents under GPT-2-style byte-level BPE tokenizers.

A byte-level BPE `tokenizer.json` (GPT-NeoX-20B's, the Pile standard) encodes a text as:
split out the added tokens, normalize, cut the rest into pieces with the GPT-2 regex, map each
piece's bytes to the byte-level alphabet, and run BPE on each piece. The same pieces recur all
through a corpus, so this encoder keeps piece -> ids in a dict and asks the tokenizer's own BPE
model (`model.tokenize`) only for pieces it has not seen: the ids are the model's by
construction, and the per-piece work that dominates `tokenizers`' own encode (normalized-string
bookkeeping, offsets, `Encoding` objects) is skipped.

It takes only what it can reproduce exactly. Documents: pure ASCII, or ASCII plus Latin-1,
Latin Extended-A/B and General Punctuation (accented letters, curly quotes, dashes), blocks whose
letter/number/space classes and normalization are the same in every Unicode version, so every
regex engine agrees on them; a document with any other character, or not already in the
tokenizer's normal form, goes to `tokenizers` unchanged. Tokenizers: a pipeline of exactly
added tokens -> optional Unicode normalization (NFC/NFD/NFKC/NFKD) ->
ByteLevel(add_prefix_space=False, use_regex=True) -> BPE.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import regex

# The GPT-2 split pattern with its Unicode classes spelled out for ASCII (letters, digits and
# the six ASCII whitespace characters that \s matches in every regex engine).
_WS = " \t\n\r\x0b\x0c"
_PIECE = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# The same split with Unicode classes, for the non-ASCII documents this encoder takes.
_PIECE_UNICODE = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# Characters outside the blocks above, plus the ASCII and C1 controls whose whitespace status
# differs between regex engines (\x1c-\x1f, \x80-\x9f): such documents go to `tokenizers`.
_NOT_TAKEN = re.compile(r"[^\x00-\x1b\x20-\x7f\xa0-\u024f\u2000-\u206f]")
_ASCII_NOT_TAKEN = re.compile(r"[\x1c-\x1f]")
_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}
# Bound on remembered pieces: memory stays flat however large the corpus.
MAX_CACHED_PIECES = 1_000_000


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _normal_forms(normalizer: dict | None) -> list[str] | None:
    """The Unicode normal forms a normalizer applies, or None when it does anything else."""
    if normalizer is None:
        return []
    if normalizer.get("type") == "Sequence":
        forms = [_normal_forms(n) for n in normalizer.get("normalizers", [])]
        return None if any(f is None for f in forms) else [x for f in forms for x in f]
    return [normalizer["type"]] if normalizer.get("type") in _FORMS else None


def _alternation(contents: list[str]) -> re.Pattern | None:
    # Longest first: Python's alternation is leftmost-first, so this gives the leftmost-longest
    # match that `tokenizers`' added-token matcher uses.
    if not contents:
        return None
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


class ByteLevelPieceEncoder:
    """Encodes ASCII texts exactly as `tok.encode(text, add_special_tokens=False).ids` would."""

    def __init__(self, tok: Any, spec: dict, forms: list[str]):
        self._model = tok.model
        self._byte_map = _bytes_to_unicode()
        self._forms = forms
        added = spec.get("added_tokens") or []
        self._added_ids = {a["content"]: a["id"] for a in added}
        # `tokenizers` splits on the non-normalized added tokens first, then on the normalized ones.
        self._raw_added = _alternation([a["content"] for a in added if not a.get("normalized", True)])
        self._norm_added = _alternation([a["content"] for a in added if a.get("normalized", True)])
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def for_tokenizer(cls, tok: Any) -> ByteLevelPieceEncoder | None:
        """The encoder when `tok`'s pipeline is one it reproduces exactly, else None."""
        try:
            spec = json.loads(tok.to_str())
        except Exception:
            return None
        pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return None
        forms = _normal_forms(spec.get("normalizer"))
        if forms is None:
            return None
        for a in spec.get("added_tokens") or []:
            if a.get("single_word") or a.get("lstrip") or a.get("rstrip") or not a["content"].isascii():
                return None
        return cls(tok, spec, forms)

    def encode(self, text: str) -> list[int] | None:
        """The ids of `text`, or None when it is not a text this encoder takes."""
        if text.isascii():
            if _ASCII_NOT_TAKEN.search(text):
                return None
            pieces = _PIECE  # every normal form is the identity on ASCII
        else:
            if _NOT_TAKEN.search(text) or not all(unicodedata.is_normalized(f, text) for f in self._forms):
                return None
            pieces = _PIECE_UNICODE
        ids: list[int] = []
        for segment, added in self._split(text, self._raw_added):
            if added:
                ids.append(self._added_ids[segment])
                continue
            for part, added2 in self._split(segment, self._norm_added):
                if added2:
                    ids.append(self._added_ids[part])
                else:
                    self._encode_pieces(part, pieces, ids)
        return ids

    @staticmethod
    def _split(text: str, pattern: re.Pattern | None):
        """(segment, is_added_token) in order; empty segments dropped."""
        if pattern is None:
            if text:
                yield text, False
            return
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                yield text[pos : m.start()], False
            yield m.group(), True
            pos = m.end()
        if pos < len(text):
            yield text[pos:], False

    def _encode_pieces(self, text: str, pieces: Any, out: list[int]) -> None:
        cache = self._cache
        for piece in pieces.findall(text):
            ids = cache.get(piece)
            if ids is None:
                if len(cache) >= MAX_CACHED_PIECES:
                    cache.clear()
                mapped = "".join(self._byte_map[b] for b in piece.encode("utf-8"))
                ids = cache[piece] = tuple(t.id for t in self._model.tokenize(mapped))
            out.extend(ids)
