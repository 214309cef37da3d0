"""The sentencepiece chunk cache against sentencepiece's own encode, on real and adversarial text,
for small models trained with each normalization and splitting option it has to get right."""

from __future__ import annotations

import json
import random
import re

import pytest
import sentencepiece as spm

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

# (name, trainer options); every model is BPE unless it says otherwise.
MODELS = {
    "nmt_nfkc": {},
    "identity_like_ours": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                               allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
                               byte_fallback=True),
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    "split_digits_byte_fallback": dict(split_digits=True, byte_fallback=True),
    "nfkc_keep_spaces": dict(normalization_rule_name="nfkc", remove_extra_whitespaces=False,
                             allow_whitespace_only_pieces=True),
    "no_split_by_whitespace": dict(split_by_whitespace=False),
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


def train(tmp_path, texts: list[str], name: str, model_type: str = "bpe",
          **options) -> spm.SentencePieceProcessor:
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()][:20_000]
    # Indented and space-aligned lines, so that models may learn whitespace-only pieces.
    lines += ["    " + ln for ln in lines[:3000]] + [ln.replace(" ", "   ") for ln in lines[3000:5000]]
    prefix = str(tmp_path / name)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=1000,
                                   model_type=model_type, character_coverage=1.0, minloglevel=2,
                                   num_threads=1, **options)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


@pytest.fixture(scope="module")
def texts(demo_corpus) -> list[str]:
    return corpus_texts(demo_corpus)


def assert_same(cache: SentencePieceChunkCache, sp: spm.SentencePieceProcessor, texts: list[str]) -> None:
    bad = [t for t in texts if cache.encode(t) != sp.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"


@pytest.mark.parametrize("name", MODELS)
def test_equals_sentencepiece_per_model_option(tmp_path, texts, name):
    sp = train(tmp_path, texts, name, **MODELS[name])
    cache = SentencePieceChunkCache.for_processor(sp)
    if name == "no_split_by_whitespace":
        # Its pieces cross word boundaries: the cache must decline (or, if none happens to, be exact).
        proto = sc._model_proto(sp)
        assert (cache is None) == (not sc.cuts_are_safe(proto))
        if cache is None:
            return
    assert cache is not None
    adversarial = random_texts(3000)
    assert_same(cache, sp, adversarial)
    assert_same(cache, sp, adversarial)  # again, now from the cache
    assert_same(cache, sp, texts[:200])


def test_equals_sentencepiece_on_the_corpus(demo_corpus, texts, tmp_path):
    """The project's own trainer (identity, spaces kept, '\\n' piece, byte fallback), BPE."""
    path = train_sentencepiece(demo_corpus, str(tmp_path / "bpe"), vocab_size=2048, model_type="bpe",
                               max_sentences=50_000)
    tok = load_tokenizer(path)
    assert tok._chunks is not None
    ref = tok._sp.encode(texts)
    assert tok.encode_batch(texts) == ref
    assert tok.encode_batch(texts) == ref  # warm cache
    assert tok.encode_batch(random_texts(2000, seed=1)) == tok._sp.encode(random_texts(2000, seed=1))


def test_unigram_models_get_no_cache(tmp_path, texts, demo_tokenizer):
    assert SentencePieceChunkCache.for_processor(train(tmp_path, texts, "uni", model_type="unigram")) is None
    assert load_tokenizer(demo_tokenizer)._chunks is None


def test_chunks_small_cache_bound(tmp_path, texts, monkeypatch):
    """The cache empties itself at its bound and stays exact."""
    monkeypatch.setattr(sc, "MAX_CACHED_CHUNKS", 50)
    sp = train(tmp_path, texts, "bound", **MODELS["identity_like_ours"])
    cache = SentencePieceChunkCache.for_processor(sp)
    assert_same(cache, sp, random_texts(500, seed=2) + texts[:20])
    assert len(cache._cache) <= 50 + max(len(set(sc._CHUNK.findall(sp.normalize(t)))) for t in texts[:20])


@pytest.mark.parametrize("broken", ["cut_at_every_space", "no_normalizer"])
def test_broken_variants_are_caught(tmp_path, texts, monkeypatch, broken):
    """The same checks fail a cache that cuts inside runs of spaces, or skips the model's normalizer."""
    sp = train(tmp_path, texts, broken, **MODELS["nfkc_keep_spaces"])
    cache = SentencePieceChunkCache.for_processor(sp)
    if broken == "cut_at_every_space":
        monkeypatch.setattr(sc, "_CHUNK", re.compile(f"{sc.WS}?[^{sc.WS}]+|{sc.WS}"))
    else:
        cache._normalize = lambda t: sc.WS + t.replace(" ", sc.WS)
    with pytest.raises(AssertionError, match="differ"):
        assert_same(cache, sp, random_texts(3000))


def test_prep_output_is_sentencepieces_own(demo_corpus, texts, tmp_path):
    """data_prep with a BPE model (so through the cache, 2 workers) writes sentencepiece's ids."""
    from data_prep.binidx import MMapIndexedDataset
    from data_prep.manifest import load_manifest
    from data_prep.pipeline import PrepSettings, run_prep

    model = train_sentencepiece(demo_corpus, str(tmp_path / "bpe"), vocab_size=2048, model_type="bpe",
                                max_sentences=50_000)
    assert load_tokenizer(model)._chunks is not None
    run_prep(PrepSettings(inputs=demo_corpus, tokenizer=str(model), output_prefix=str(tmp_path / "out"),
                          workers=2, shards=1, progress=False))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    got = []
    for shard in load_manifest(str(tmp_path / "out.manifest.json"))["shards"]:
        ds = MMapIndexedDataset(shard["prefix"])
        got += [ds[i].tolist() for i in range(len(ds))]
    assert got == [sp.encode(t) + [sp.eos_id()] for t in texts]
