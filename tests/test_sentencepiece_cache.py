"""The sentencepiece chunk cache (C++, data_prep/csrc/sentencepiece_exact.cpp) against sentencepiece's
own encode and normalizer, on real, long and adversarial text, for small unigram and BPE models trained
with each normalization and splitting option it has to get right."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm

from data_prep import native
from data_prep import sentencepiece_cache as sc
from data_prep.readers import iter_records
from data_prep.sentencepiece_cache import SentencePieceChunkCache
from data_prep.tokenizer import load_tokenizer
from data_prep.train_tokenizer import train_sentencepiece

# Runs of every kind of whitespace (NFKC and whitespace collapsing rewrite some), digits (for
# split_digits), punctuation, non-ASCII letters, full-width and compatibility characters (NFKC
# rewrites them), characters no model has seen (unknown / byte fallback), and a literal '▁'.
ALPHABET = list("ab cdSsTt  \n\t\r\x0b\x0c0189.,;:!?-_'\"()[]{}<|>") + [
    "   ", "\n\n", " \n ", "  \t", "\u3000", "\u00a0", "ﬁ", "Ａ", "①", "é", "e\u0301", "ü", "ß",
    "日本", "語", "😀", "\u2581", "\u2581\u2581", "\x00", "\x1f", "\u200b", "the", " the ", "and",
]

# What this project's trainer sets (data_prep/train_tokenizer.py).
LIKE_OURS = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                 allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], byte_fallback=True)
# (name, trainer options); BPE unless the name starts with "unigram".
MODELS = {
    "nmt_nfkc": {},
    "identity_like_ours": LIKE_OURS,
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    "split_digits_byte_fallback": dict(split_digits=True, byte_fallback=True),
    "nfkc_keep_spaces": dict(normalization_rule_name="nfkc", remove_extra_whitespaces=False,
                             allow_whitespace_only_pieces=True),
    "no_split_by_whitespace": dict(split_by_whitespace=False),
    "unigram_nmt_nfkc": {},
    "unigram_identity_like_ours": LIKE_OURS,
    "unigram_no_dummy_prefix": dict(add_dummy_prefix=False),
    "unigram_split_digits_byte_fallback": dict(split_digits=True, byte_fallback=True),
    # Case folding; user-defined symbols pass the normalizer untouched and always win the Viterbi.
    "unigram_nfkc_cf_user_symbols": dict(normalization_rule_name="nmt_nfkc_cf",
                                         user_defined_symbols=["<tag>", "Ａ", "the", "\n"]),
    # Unknown characters (no byte fallback): runs of them become one <unk>.
    "unigram_unknowns_keep_spaces": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                         character_coverage=0.995),
    "unigram_no_split_by_whitespace": dict(split_by_whitespace=False),
    # No charsmap (the normalizer's fast path) with whitespace collapsing; a user-defined symbol that
    # starts with a space sends every space through the general path.
    "identity_collapse_spaces": dict(normalization_rule_name="identity", user_defined_symbols=["::"]),
    "unigram_identity_collapse_spaces": dict(normalization_rule_name="identity"),
    "unigram_identity_space_symbol": dict(normalization_rule_name="identity", user_defined_symbols=[" ::"]),
}


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def corpus_texts(corpus: list[str], n: int | None = None) -> list[str]:
    out = []
    for path in corpus:
        for raw in iter_records(path):
            out.append(json.loads(raw)["text"])
            if len(out) == n:
                return out
    return out


def train(tmp_path, texts: list[str], name: str, **options) -> spm.SentencePieceProcessor:
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()][:20_000]
    # Indented and space-aligned lines, so that models may learn whitespace-only pieces.
    lines += ["    " + ln for ln in lines[:3000]] + [ln.replace(" ", "   ") for ln in lines[3000:5000]]
    prefix = str(tmp_path / name)
    options = {"character_coverage": 1.0, **options}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=1000,
                                   model_type="unigram" if name.startswith("unigram") else "bpe",
                                   minloglevel=2, num_threads=1, **options)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


@pytest.fixture(scope="module")
def texts(demo_corpus) -> list[str]:
    return corpus_texts(demo_corpus)


def long_texts(texts: list[str], n: int = 4) -> list[str]:
    """The corpus as a few texts of ~1 MB: unigram scores summed over them pass sentencepiece's
    re-basing threshold many times, and chunks arrive with large scores."""
    return ["\n".join(texts[i::n]) for i in range(n)]


def assert_same(cache: SentencePieceChunkCache, sp: spm.SentencePieceProcessor, texts: list[str]) -> None:
    got, ref = cache.encode_batch(texts), sp.encode(texts)
    bad = [t for t, a, b in zip(texts, got, ref, strict=True) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"


@pytest.mark.parametrize("name", MODELS)
def test_equals_sentencepiece_per_model_option(tmp_path, texts, name):
    sp = train(tmp_path, texts, name, **MODELS[name])
    cache = SentencePieceChunkCache.for_processor(sp)
    if name.endswith("no_split_by_whitespace"):
        # Its pieces cross word boundaries: the cache must decline (or, if none happens to, be exact).
        proto = sc._model_proto(sp)
        assert (cache is None) == (not sc.cuts_are_safe(proto))
        if cache is None:
            return
    assert cache is not None
    assert cache.model_type == ("unigram" if name.startswith("unigram") else "bpe")
    adversarial = random_texts(3000)
    assert [cache.normalize(t) for t in adversarial] == [sp.normalize(t) for t in adversarial]
    assert_same(cache, sp, adversarial)
    assert_same(cache, sp, adversarial)  # again, now from the cache
    assert_same(cache, sp, texts[:200])
    if cache.model_type == "unigram":
        cache.use_cache(0)  # the Viterbi replica alone
        assert_same(cache, sp, adversarial[:1000] + texts[:50])


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_equals_sentencepiece_on_the_corpus(demo_corpus, texts, tmp_path, model_type):
    """The project's own trainer (identity, spaces kept, '\\n' piece, byte fallback)."""
    path = train_sentencepiece(demo_corpus, str(tmp_path / model_type), vocab_size=2048,
                               model_type=model_type, max_sentences=50_000)
    tok = load_tokenizer(path)
    assert tok._chunks is not None and tok._chunks.model_type == model_type
    ref = tok._sp.encode(texts)
    assert tok.encode_batch(texts) == ref
    assert tok.encode_batch(texts) == ref  # warm cache
    flat, sizes = tok.encode_flat(texts[:40], eod=7)
    assert flat.tolist() == [i for ids in ref[:40] for i in ids + [7]]
    assert sizes.tolist() == [len(ids) + 1 for ids in ref[:40]]
    assert tok.encode_batch(random_texts(2000, seed=1)) == tok._sp.encode(random_texts(2000, seed=1))


def test_unigram_long_texts(demo_tokenizer, texts):
    """Unigram, texts of ~1 MB: exact with the cache (some chunks segmented again from the score they
    arrive with) and with the Viterbi replica alone."""
    tok = load_tokenizer(demo_tokenizer)
    cache, sp = tok._chunks, tok._sp
    long = long_texts(texts)
    ref = sp.encode(long)
    assert cache.encode_batch(long) == ref
    before = cache.replica_chunks()
    assert cache.encode_batch(long) == ref  # every chunk cached now
    assert cache.replica_chunks() > before
    cache.use_cache(0)
    assert cache.encode_batch(long) == ref


def test_unigram_exact_ties_follow_sentencepieces_rounding(demo_tokenizer, texts):
    """A word with two segmentations of exactly equal score, x + y = z: sentencepiece's float32 sums
    pick one or the other depending on the score the text has reached. The cache must follow (it
    never trusts a cached path with so small a margin); trusting it blindly (mode 2) goes wrong."""
    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    m = sc._model_proto(sp)
    normal = {p.piece: i for i, p in enumerate(m.pieces) if p.type == sc.NORMAL}
    z, x, y = next((z, z[:k], z[k:]) for z in sorted(normal, key=lambda q: m.pieces[normal[q]].score,
                                                      reverse=True)
                   if z.startswith(sc.WS) for k in range(2, len(z)) if z[:k] in normal and z[k:] in normal)
    # Exact in float32, and x + y == z exactly; at |P| >= 2^15 the roundings of P + x + y and P + z differ.
    m.pieces[normal[x]].score = -3 - 3 / 1024
    m.pieces[normal[y]].score = -4 - 3 / 1024
    m.pieces[normal[z]].score = -7 - 6 / 1024
    tied = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    cache = SentencePieceChunkCache.for_processor(tied)
    assert cache is not None
    batch = [z.replace(sc.WS, " ") * 40_000, *long_texts(texts, 2)]
    ref = tied.encode(batch)
    assert {normal[x], normal[z]} <= set(ref[0])  # sentencepiece itself takes both, by position
    assert cache.encode_batch(batch) == ref
    assert cache.encode_batch(batch) == ref
    cache.use_cache(2)
    assert cache.encode_batch(batch[:1]) != ref[:1]


def test_chunks_small_cache_bound(tmp_path, texts, monkeypatch):
    """The cache empties itself at its bound (between batches) and stays exact."""
    monkeypatch.setattr(sc, "MAX_CACHED_CHUNKS", 50)
    for name in ("identity_like_ours", "unigram_identity_like_ours"):
        sp = train(tmp_path, texts, name, **MODELS[name])
        cache = SentencePieceChunkCache.for_processor(sp)
        batches = [random_texts(50, seed=s) for s in range(5)] + [texts[:3], texts[3:6]]
        for batch in batches:
            assert_same(cache, sp, batch)
            assert cache.cached_chunks() <= 50 + len({c for t in batch for c in chunks(sp.normalize(t))})


def chunks(normalized: str) -> list[str]:
    """An independent statement of the cut: before every '▁' that follows another character."""
    out, start = [], 0
    for i in range(1, len(normalized)):
        if normalized[i] == sc.WS and normalized[i - 1] != sc.WS:
            out.append(normalized[start:i])
            start = i
    return out + ([normalized[start:]] if normalized[start:] else [])


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_prep_output_is_sentencepieces_own(demo_corpus, texts, tmp_path, model_type):
    """data_prep (through the cache, 2 workers) writes sentencepiece's ids."""
    from data_prep.binidx import MMapIndexedDataset
    from data_prep.manifest import load_manifest
    from data_prep.pipeline import PrepSettings, run_prep

    model = train_sentencepiece(demo_corpus, str(tmp_path / model_type), vocab_size=2048,
                                model_type=model_type, max_sentences=50_000)
    assert load_tokenizer(model)._chunks is not None
    run_prep(PrepSettings(inputs=demo_corpus, tokenizer=str(model), output_prefix=str(tmp_path / "out"),
                          workers=2, shards=1, progress=False))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    got = []
    for shard in load_manifest(str(tmp_path / "out.manifest.json"))["shards"]:
        ds = MMapIndexedDataset(shard["prefix"])
        got += [ds[i].tolist() for i in range(len(ds))]
    assert got == [sp.encode(t) + [sp.eos_id()] for t in texts]


def test_unigram_needs_the_sentencepiece_it_replicates(demo_tokenizer, monkeypatch):
    monkeypatch.setattr(sc, "_sentencepiece_version", lambda: (0, 2, 1))
    assert load_tokenizer(demo_tokenizer)._chunks is None


def test_a_disagreeing_sentencepiece_is_not_trusted(demo_tokenizer, capsys):
    """The probe texts catch a sentencepiece whose encoding differs from the replica's."""
    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)

    class Shifted:
        serialized_model_proto = sp.serialized_model_proto

        @staticmethod
        def encode(texts):
            return [[i + 1 for i in ids] for ids in sp.encode(texts)]

    assert SentencePieceChunkCache.for_processor(sp) is not None
    assert SentencePieceChunkCache.for_processor(Shifted()) is None
    assert "disagrees" in capsys.readouterr().err


def test_without_a_compiler_the_plain_path_is_used(demo_tokenizer, texts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(native.BUILD_DIR_ENV, str(tmp_path / "build"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.load_library.cache_clear()
    try:
        tok = load_tokenizer(demo_tokenizer)
        assert tok._chunks is None
        assert "could not build" in capsys.readouterr().err
        assert tok.encode_batch(texts[:20]) == tok._sp.encode(texts[:20])
    finally:
        native.load_library.cache_clear()
