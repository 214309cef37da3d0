"""Our tokenizer wrappers against the tokenizer libraries used directly (and an independent World matcher)."""

from __future__ import annotations

import ast
import json
import sys

import pytest

from data_prep.readers import iter_records
from data_prep.tokenizer import load_tokenizer, world_vocab_path

SAMPLES = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "Unicode: café, naïve, Straße, 日本語のテキスト, emoji 🙂, Ελληνικά",
    "x",
]


def demo_texts(corpus: list[str], n: int) -> list[str]:
    out = []
    for raw in iter_records(corpus[1]):
        out.append(json.loads(raw)["text"])
        if len(out) == n:
            break
    return out


def test_sentencepiece_matches_library(demo_tokenizer, demo_corpus):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    tok = load_tokenizer(demo_tokenizer)
    texts = SAMPLES + demo_texts(demo_corpus, 5)
    assert tok.kind == "sentencepiece"
    assert tok.vocab_size == ref.get_piece_size() == 2048
    assert tok.eod_id == ref.eos_id() == 0
    assert [tok.encode(t) for t in texts] == [ref.encode(t) for t in texts]
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts]
    # The demo model keeps text unnormalized, so decoding gives the text back.
    assert [tok.decode(tok.encode(t)) for t in texts] == texts


def test_hf_tokenizer_matches_library(hf_tokenizer_json, demo_corpus):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(hf_tokenizer_json)
    tok = load_tokenizer(hf_tokenizer_json)
    texts = SAMPLES + demo_texts(demo_corpus, 5)
    assert tok.kind == "hf"
    assert tok.eod_id == ref.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    expected = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert [tok.encode(t) for t in texts] == expected
    assert tok.encode_batch(texts) == expected
    assert [tok.decode(e) for e in expected] == texts


def test_hf_tokenizer_matches_transformers(hf_tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer_json)
    tok = load_tokenizer(hf_tokenizer_json)
    assert [tok.encode(t) for t in SAMPLES] == [ref.encode(t, add_special_tokens=False) for t in SAMPLES]


def test_hf_tokenizer_without_eod_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "noeod.json"
    tok.save(str(path))
    with pytest.raises(ValueError, match="noeod.json.*end-of-document"):
        load_tokenizer(path)
    assert load_tokenizer(path, eod_token="b").eod_id == 1


def _world_reference():
    """Greedy longest byte match over the vocabulary file, parsed independently with ast."""
    vocab = {}
    for line in world_vocab_path().read_text(encoding="utf-8").splitlines():
        idx, rest = line.split(" ", 1)
        literal, length = rest.rsplit(" ", 1)
        piece = ast.literal_eval(literal)
        piece = piece.encode("utf-8") if isinstance(piece, str) else piece
        assert len(piece) == int(length)
        vocab[piece] = int(idx)
    longest = max(map(len, vocab))

    def encode(text: str) -> list[int]:
        b, i, out = text.encode("utf-8"), 0, []
        while i < len(b):
            for n in range(min(longest, len(b) - i), 0, -1):
                if b[i : i + n] in vocab:
                    out.append(vocab[b[i : i + n]])
                    i += n
                    break
            else:
                raise AssertionError(f"byte {b[i]} not in vocabulary")
        return out

    return encode, len(vocab)


def test_rwkv_world_matches_greedy_longest_match(demo_corpus):
    ref_encode, n_pieces = _world_reference()
    tok = load_tokenizer("rwkv-world")
    texts = SAMPLES + [t[:2000] for t in demo_texts(demo_corpus, 2)]
    assert tok.eod_id == 0
    assert tok.vocab_size == 65536 > n_pieces
    assert [tok.encode(t) for t in texts] == [ref_encode(t) for t in texts]
    assert tok.encode_batch(texts) == [ref_encode(t) for t in texts]
    assert [tok.decode(tok.encode(t) + [0]) for t in texts] == texts


def test_rwkv_world_matches_the_rwkv_package(demo_corpus):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    ref = TRIE_TOKENIZER(str(world_vocab_path()))
    tok = load_tokenizer("rwkv-world")
    texts = SAMPLES + demo_texts(demo_corpus, 20)
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts]
    assert [tok.decode(ref.encode(t)) for t in texts] == [ref.decode(ref.encode(t)) for t in texts]


def test_identity_follows_the_vocabulary_file(demo_tokenizer, hf_tokenizer_json, tmp_path):
    a = load_tokenizer(demo_tokenizer)
    assert a.identity == load_tokenizer(demo_tokenizer).identity
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(demo_tokenizer, "rb").read())
    assert load_tokenizer(copy).identity == a.identity  # same vocabulary, same identity wherever it lives
    ids = {a.identity, load_tokenizer(hf_tokenizer_json).identity, load_tokenizer("rwkv-world").identity}
    assert len(ids) == 3


@pytest.mark.parametrize("spec, error, message", [
    ("/nonexistent/tok.json", FileNotFoundError, "/nonexistent/tok.json"),
    ("rwkv-wrold", FileNotFoundError, "rwkv-wrold"),
])
def test_bad_specs_name_the_problem(spec, error, message):
    with pytest.raises(error, match=message):
        load_tokenizer(spec)


def test_unreadable_files_are_named(tmp_path):
    bad_model = tmp_path / "broken.model"
    bad_model.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.model"):
        load_tokenizer(bad_model)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(bad_json)
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(other)


def test_train_tokenizer_cli(tmp_path):
    import subprocess
    import sys

    import sentencepiece as spm

    lines = [f'{{"text": "Line {i} of a small corpus,\\nwith words that repeat: alpha beta gamma {i % 7}."}}'
             for i in range(400)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "data_prep.train_tokenizer", "--input"]
    r = subprocess.run([*cmd, str(tmp_path / "c.jsonl"),
                        "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert sp.get_piece_size() == 300 and sp.eos_id() == 0 and sp.id_to_piece(0) == "<|endoftext|>"
    text = "Line 3 of a small corpus,\nwith  unseen words: Zürich ✓"
    assert sp.decode(sp.encode(text)) == text
    r = subprocess.run([*cmd, str(tmp_path / "no.jsonl"),
                        "--model-prefix", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no.jsonl" in r.stderr


def test_rwkv_world_without_the_rust_package_falls_back_to_the_trie(monkeypatch):
    from data_prep.tokenizer import WorldTokenizer

    monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", None)  # makes the import fail
    tok = WorldTokenizer()
    ref_encode, _ = _world_reference()
    assert tok.encode_batch(SAMPLES) == [ref_encode(t) for t in SAMPLES]
    assert tok.backend == "rwkv.rwkv_tokenizer"
