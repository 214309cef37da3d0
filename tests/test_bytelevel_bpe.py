"""The ASCII piece-cache encoder against `tokenizers`' own encode, on real and adversarial text."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

from data_prep.bytelevel_bpe import ByteLevelPieceEncoder
from data_prep.readers import iter_records
from data_prep.tokenizer import load_tokenizer

# Characters and strings that exercise every branch of the GPT-2 split: contractions, runs of
# spaces before words and before line ends, digits, punctuation runs, the ASCII whitespace
# characters, and added tokens (special ones and GPT-NeoX-20B's runs of spaces).
ALPHABET = list("ab cdSsTt  \n\t\r\x0b\x0c0189.,;:!?-_'\"()[]{}<|>") + [
    "<|endoftext|>", "<|padding|>", "'s", "'ll", "'VE", "   ", "\n\n", " \n ", "  \t",
]


def neox_like(path: str) -> Tokenizer:
    """The test tokenizer reshaped like GPT-NeoX-20B's: NFC, space-run added tokens, specials."""
    tok = Tokenizer.from_file(path)
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(" " * n, normalized=True) for n in range(2, 25)])
    tok.add_tokens([AddedToken("<raw>", normalized=False)])
    tok.add_special_tokens(["<|endoftext|>", "<|padding|>"])
    return tok


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET + ["<raw>"]) for _ in range(rng.randint(0, 50))) for _ in range(n)]


def corpus_texts(corpus: list[str], n: int) -> list[str]:
    out = []
    for path in corpus:
        for raw in iter_records(path):
            out.append(json.loads(raw)["text"])
            if len(out) == n:
                return out
    return out


def test_equals_tokenizers_on_the_corpus(hf_tokenizer_json, demo_corpus):
    ref = Tokenizer.from_file(hf_tokenizer_json)
    enc = ByteLevelPieceEncoder.for_tokenizer(ref)
    assert enc is not None
    texts = [t for t in corpus_texts(demo_corpus, 120) if t.isascii()]
    assert len(texts) > 100
    assert [enc.encode(t) for t in texts] == [ref.encode(t, add_special_tokens=False).ids for t in texts]


def test_equals_tokenizers_with_added_tokens_and_normalizer(hf_tokenizer_json):
    ref = neox_like(hf_tokenizer_json)
    enc = ByteLevelPieceEncoder.for_tokenizer(ref)
    assert enc is not None
    texts = random_texts(5000)
    got = [enc.encode(t) for t in texts]
    assert all(g is not None for g in got)
    assert got == [ref.encode(t, add_special_tokens=False).ids for t in texts]


# Every character the encoder takes beyond ASCII, each in contexts that put it next to letters,
# digits, spaces, punctuation and a contraction.
TAKEN = [chr(c) for c in [*range(0xA0, 0x250), *range(0x2000, 0x2070)]]
CONTEXTS = ["a{c}b", " {c}", "{c}{c} x", "1{c}2", "{c}'s", "x {c}\n", "  {c}  y", "{c}.{c}"]


@pytest.mark.parametrize(
    "normalizer", [normalizers.NFC(), normalizers.NFKC(), None], ids=["NFC", "NFKC", "none"]
)
def test_equals_tokenizers_on_every_non_ascii_character_it_takes(hf_tokenizer_json, normalizer):
    ref = neox_like(hf_tokenizer_json)
    ref.normalizer = normalizer
    enc = ByteLevelPieceEncoder.for_tokenizer(ref)
    texts = [ctx.format(c=c) for c in TAKEN for ctx in CONTEXTS]
    texts += ["“Curly quotes” — and naïve café résumé façade, ½ °C ±2 µm…"]
    got = [enc.encode(t) for t in texts]
    taken = [(t, g) for t, g in zip(texts, got, strict=True) if g is not None]
    assert len(taken) > 0.8 * len(texts)
    assert [g for _, g in taken] == [ref.encode(t, add_special_tokens=False).ids for t, _ in taken]


def test_other_text_is_left_to_tokenizers(hf_tokenizer_json):
    enc = ByteLevelPieceEncoder.for_tokenizer(neox_like(hf_tokenizer_json))
    assert enc.encode("日本語のテキスト") is None  # outside the blocks it takes
    assert enc.encode("emoji 🙂") is None
    assert enc.encode("field\x1fseparator") is None  # whitespace or not depends on the regex engine
    assert enc.encode("cafe\u0301") is None  # not in NFC: the tokenizer's normalizer would change it


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
        lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()),
        lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
        lambda t: t.add_tokens([AddedToken("<w>", single_word=True)]),
    ],
    ids=["prefix-space", "other-pre-tokenizer", "lowercase", "single-word-added-token"],
)
def test_pipelines_it_cannot_reproduce_are_declined(hf_tokenizer_json, change):
    tok = Tokenizer.from_file(hf_tokenizer_json)
    change(tok)
    assert ByteLevelPieceEncoder.for_tokenizer(tok) is None


def test_wrapper_batch_mixes_both_paths(hf_tokenizer_json, tmp_path):
    path = tmp_path / "tokenizer.json"
    ref = neox_like(hf_tokenizer_json)
    ref.save(str(path))
    tok = load_tokenizer(str(path))
    texts = random_texts(300, seed=1) + ["naïve café  <|endoftext|>", "plain ascii  text\n"]
    assert tok.encode_batch(texts) == [ref.encode(t, add_special_tokens=False).ids for t in texts]
