"""Shared fixtures: the embedded demo corpus, a sentencepiece tokenizer trained on it, and its token shards.

Built once per test session (a few seconds) under pytest's temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "data" / "demo" / "train"
DEMO_VOCAB_SIZE = 2048


@pytest.fixture(scope="session")
def demo_corpus() -> list[str]:
    """Paths of the two embedded Shakespeare `.jsonl.zst` files, in order."""
    paths = [DEMO_DIR / "00.jsonl.zst", DEMO_DIR / "01.jsonl.zst"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"demo corpus missing: {missing} (rebuild with data/demo/build_corpus.py)")
    return [str(p) for p in paths]


@pytest.fixture(scope="session")
def demo_tokenizer(demo_corpus, tmp_path_factory) -> str:
    """Path of a sentencepiece `.model` (vocab 2048, end-of-document id 0) trained on the demo corpus."""
    from data_prep.train_tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("demo_tokenizer") / "demo_sp"
    return str(train_sentencepiece(demo_corpus, str(out), vocab_size=DEMO_VOCAB_SIZE, max_sentences=50_000))


@pytest.fixture(scope="session")
def demo_shards(demo_corpus, demo_tokenizer, tmp_path_factory) -> str:
    """Path of `demo.manifest.json`: the demo corpus tokenized into 2 binidx shards (with EOD)."""
    from data_prep.pipeline import PrepSettings, run_prep

    out = tmp_path_factory.mktemp("demo_shards") / "demo"
    run_prep(PrepSettings(inputs=demo_corpus, tokenizer=demo_tokenizer, output_prefix=str(out),
                          workers=1, shards=2, progress=False))
    return f"{out}.manifest.json"


@pytest.fixture(scope="session")
def hf_tokenizer_json(demo_corpus, tmp_path_factory) -> str:
    """A small byte-level BPE `tokenizer.json` (GPT-NeoX style, `<|endoftext|>` = 0) trained on the corpus."""
    import json

    import zstandard
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with zstandard.ZstdDecompressor().stream_reader(open(demo_corpus[1], "rb")) as r:
        for line in r.read().splitlines()[:60]:
            texts.append(json.loads(line)["text"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return str(path)
