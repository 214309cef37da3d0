"""Train a sentencepiece tokenizer on a corpus: `python -m data_prep.train_tokenizer`.

The corpus is read with the same streaming readers as the prep step (.jsonl,
.jsonl.zst, .parquet, .txt); each non-empty line of each good document is one
training sentence. The model reserves id 0 for the end-of-document token, as
RWKV and the Pile's GPT-NeoX tokenizer do, keeps text unnormalized (newline is
a piece of its own) and falls back to bytes, so any text encodes and decodes
back to itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from .documents import parse_record
from .output_paths import check_writable_file
from .pipeline import expand_inputs
from .readers import TXT_MODES, iter_records


def corpus_sentences(inputs: list[str], text_key: str = "text", txt_mode: str = "file",
                     max_sentences: int | None = None) -> Iterator[str]:
    n = 0
    for path in expand_inputs(inputs):
        for raw in iter_records(path, text_key, txt_mode):
            text, _, reason = parse_record(raw, text_key)
            if reason is not None:
                continue
            for line in text.splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if max_sentences is not None and n >= max_sentences:
                        return


def train_sentencepiece(inputs: list[str], model_prefix: str, vocab_size: int = 2048,
                        model_type: str = "unigram", text_key: str = "text", txt_mode: str = "file",
                        max_sentences: int | None = 100_000, threads: int = 2) -> Path:
    """Train and write `model_prefix.model` (and `.vocab`); returns the .model path."""
    import sentencepiece as spm

    check_writable_file(f"{model_prefix}.model", "the tokenizer model (--model-prefix)")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    seen = 0

    def sentences() -> Iterator[str]:
        nonlocal seen
        for line in corpus_sentences(inputs, text_key, txt_mode):
            seen += 1
            yield line

    try:
        _train(spm, sentences(), model_prefix, vocab_size, model_type, max_sentences, threads)
    except RuntimeError:
        if seen == 0:  # sentencepiece only says "[!sentences_.empty()]"
            raise ValueError(f"{', '.join(map(str, inputs))}: no text to train on (no records, or every "
                             "record empty or bad)") from None
        raise
    return Path(f"{model_prefix}.model")


def _train(spm, sentences: Iterator[str], model_prefix: str, vocab_size: int, model_type: str,
           max_sentences: int | None, threads: int) -> None:
    spm.SentencePieceTrainer.train(
        # Every line is streamed; sentencepiece keeps a uniform random sample of max_sentences of them.
        sentence_iterator=sentences,
        input_sentence_size=max_sentences or 0,
        shuffle_input_sentence=True,
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        # Keep text exactly as written (newlines, runs of spaces) so decode(encode(t)) == t.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        eos_id=0,
        unk_id=1,
        bos_id=-1,
        pad_id=-1,
        eos_piece="<|endoftext|>",
        num_threads=threads,
        minloglevel=2,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.train_tokenizer",
                                description="Train a sentencepiece model on a corpus.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--text-key", default="text")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="file")
    p.add_argument("--max-sentences", type=int, default=100_000,
                   help="train on a random sample of at most this many lines (bounds time and memory)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    try:
        path = train_sentencepiece(a.input, a.model_prefix, a.vocab_size, a.model_type, a.text_key,
                                   a.txt_mode, a.max_sentences, a.threads)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"train_tokenizer: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
