"""The prep pipeline end to end: tokens equal the tokenizer's own encoding, worker-count independence,
filters, bad input, parquet/txt inputs, node split + merge, inspect."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.binidx import MMapIndexedDataset
from data_prep.manifest import load_manifest, merge_manifests
from data_prep.pipeline import PrepSettings, run_prep

REPO = Path(__file__).resolve().parents[1]


def read_jsonl_zst(path) -> list[dict]:
    """Independent reader of a .jsonl.zst file (whole file in memory; test data is small)."""
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(f.read())
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def all_tokens(manifest_path) -> list[list[int]]:
    m = load_manifest(manifest_path)
    out = []
    for shard in m["shards"]:
        ds = MMapIndexedDataset(shard["prefix"])
        assert len(ds) == shard["documents"] and ds.n_tokens == shard["tokens"]
        out += [ds[i].tolist() for i in range(len(ds))]
    return out


def shard_bytes(manifest_path) -> list[tuple[bytes, bytes]]:
    m = load_manifest(manifest_path)
    return [(Path(s["prefix"] + ".bin").read_bytes(), Path(s["prefix"] + ".idx").read_bytes())
            for s in m["shards"]]


def prep(tmp_path, name, **kw) -> Path:
    run_prep(PrepSettings(output_prefix=str(tmp_path / name), progress=False, **kw))
    return tmp_path / f"{name}.manifest.json"


def cli(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "data_prep", *map(str, args), "--no-progress"]
                       if args and args[0] not in ("inspect", "merge") else
                       [sys.executable, "-m", "data_prep", *map(str, args)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def test_demo_shards_hold_the_tokenizers_own_encoding(demo_shards, demo_corpus, demo_tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    records = [r for p in demo_corpus for r in read_jsonl_zst(p)]
    expected = [sp.encode(r["text"]) + [sp.eos_id()] for r in records]
    assert all_tokens(demo_shards) == expected

    m = load_manifest(demo_shards)
    assert m["dtype"] == "uint16" and len(m["shards"]) == 2
    assert m["documents"] == len(records) and m["tokens"] == sum(map(len, expected))
    assert m["tokenizer"]["vocab_size"] == 2048 and m["tokenizer"]["eod_id"] == 0
    assert m["skipped"] == {}
    by_set: dict[str, list[int]] = {}
    for r, e in zip(records, expected, strict=True):
        slot = by_set.setdefault(r["meta"]["pile_set_name"], [0, 0])
        slot[0] += 1
        slot[1] += len(e)
    assert {k: [v["documents"], v["tokens"]] for k, v in m["pile_set_names"].items()} == by_set
    assert [i["sha256"] for i in m["inputs"]] == [hashlib.sha256(open(p, "rb").read()).hexdigest()
                                                  for p in demo_corpus]
    assert [i["records"] for i in m["inputs"]] == [len(read_jsonl_zst(p)) for p in demo_corpus]
    assert all(k in m["timings"] for k in ("seconds", "docs_per_s", "mb_per_s", "tokens_per_s"))


def test_identical_bytes_for_any_worker_count(tmp_path, demo_corpus, demo_tokenizer):
    # 1 worker: inline; 2 workers, 3 shards: each worker writes whole shards; 4 workers: this
    # process reads, the workers share each shard's chunks.
    runs = [prep(tmp_path, f"w{w}", inputs=demo_corpus, tokenizer=demo_tokenizer, workers=w, shards=3)
            for w in (1, 2, 4)]
    assert shard_bytes(runs[0]) == shard_bytes(runs[1]) == shard_bytes(runs[2])
    assert len(shard_bytes(runs[0])) == 3


def test_hf_tokenizer_with_workers_no_eod_and_set_filters(tmp_path, demo_corpus, hf_tokenizer_json):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(hf_tokenizer_json)
    records = [r for p in demo_corpus for r in read_jsonl_zst(p)][:300]
    man = prep(tmp_path, "hf", inputs=demo_corpus, tokenizer=hf_tokenizer_json, workers=2, append_eod=False,
               include_sets=["Comedies", "Tragedies", "Histories"], exclude_sets=["Histories"],
               max_documents=300)
    kept = [r for r in records if r["meta"]["pile_set_name"] in ("Comedies", "Tragedies")]
    assert kept, "the cap should still leave some documents"
    assert all_tokens(man) == [ref.encode(r["text"], add_special_tokens=False).ids for r in kept]
    m = load_manifest(man)
    assert m["skipped"] == {"filtered_by_set": len(records) - len(kept)}
    assert set(m["pile_set_names"]) == {r["meta"]["pile_set_name"] for r in kept}


BAD_LINES = [
    (b'{"text": "first good document", "meta": {"pile_set_name": "A"}}', None),
    (b'{"text": "broken json', "invalid_json"),
    (b'{"meta": {"pile_set_name": "A"}}', "missing_text"),
    (b'{"text": 42}', "non_string_text"),
    (b'{"text": null}', "non_string_text"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": "   \\n  "}', "empty_text"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
    (b'{"text": "lone surrogate \\ud800 here"}', "invalid_utf8"),
    (b'["a list", "not an object"]', "not_an_object"),
    (b'{"text": "second good document \\u00e9\\n with a newline"}', None),
    (b"", None),  # blank lines are not records
    (b'{"text": "third good, last line without newline"}', None),
]


def test_bad_records_are_counted_and_good_ones_kept(tmp_path, demo_tokenizer):
    import sentencepiece as spm

    path = tmp_path / "mixed.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(line for line, _ in BAD_LINES)))
    man = prep(tmp_path, "mixed", inputs=[str(path)], tokenizer=demo_tokenizer, workers=2)
    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    good = [json.loads(line)["text"] for line, reason in BAD_LINES if line and reason is None]
    assert all_tokens(man) == [sp.encode(t) + [0] for t in good]
    expected_skips: dict[str, int] = {}
    for _, reason in BAD_LINES:
        if reason:
            expected_skips[reason] = expected_skips.get(reason, 0) + 1
    m = load_manifest(man)
    assert m["skipped"] == expected_skips
    assert m["inputs"][0]["records"] == len(BAD_LINES) - 1


def _truncated_and_good(tmp_path, demo_corpus) -> tuple[Path, Path]:
    good = Path(demo_corpus[1])
    raw = Path(demo_corpus[0]).read_bytes()
    bad = tmp_path / "cut.jsonl.zst"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad, good


def test_truncated_zst_stops_with_file_and_offset(tmp_path, demo_corpus, demo_tokenizer):
    bad, good = _truncated_and_good(tmp_path, demo_corpus)
    r = cli("--input", good, bad, "--tokenizer", demo_tokenizer, "--output-prefix", tmp_path / "o",
            "--workers", "1", check=False)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "truncated zstd stream" in r.stderr and "offset" in r.stderr
    assert "--skip-bad-files" in r.stderr
    assert not list(tmp_path.glob("o*.bin")) and not list(tmp_path.glob("o*.manifest.json"))


def test_corrupt_zst_stops_with_file_and_offset(tmp_path, demo_corpus, demo_tokenizer):
    raw = bytearray(Path(demo_corpus[1]).read_bytes())
    raw[: 4] = b"\x00\x01\x02\x03"  # not a zstd frame
    bad = tmp_path / "garbage.jsonl.zst"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"garbage\.jsonl\.zst: corrupt zstd data .* offset \d+"):
        prep(tmp_path, "g", inputs=[str(bad)], tokenizer=demo_tokenizer, workers=1)


def test_skip_bad_files_goes_on_and_counts(tmp_path, demo_corpus, demo_tokenizer):
    import sentencepiece as spm

    bad, good = _truncated_and_good(tmp_path, demo_corpus)
    cli("--input", bad, good, "--tokenizer", demo_tokenizer, "--output-prefix", tmp_path / "o",
        "--workers", "2", "--skip-bad-files")
    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    expected = [sp.encode(r["text"]) + [0] for r in read_jsonl_zst(good)]
    assert all_tokens(tmp_path / "o.manifest.json") == expected
    m = load_manifest(tmp_path / "o.manifest.json")
    assert m["skipped"] == {"bad_file": 1}
    assert [b["path"] for b in m["bad_files"]] == [str(bad)]
    assert [i["path"] for i in m["inputs"]] == [str(good)]


def test_parquet_and_txt_inputs(tmp_path, demo_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sentencepiece as spm

    texts = ["First parquet row.", "", "Third row\nwith two lines.", None]
    sets = ["Pile-CC", "Pile-CC", "Wikipedia (en)", "Pile-CC"]
    table = pa.table({"text": texts, "meta": [{"pile_set_name": s} for s in sets]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    txt = "A plain text book.\n\nIts second paragraph.\n"
    (tmp_path / "book.txt").write_text(txt, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    man = prep(tmp_path, "mixed", inputs=[str(tmp_path / "rows.parquet"), str(tmp_path / "book.txt"),
                                          str(tmp_path / "latin1.txt")], tokenizer=demo_tokenizer, workers=1)
    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    expected = [sp.encode(t) + [0] for t in (texts[0], texts[2], txt)]
    assert all_tokens(man) == expected
    m = load_manifest(man)
    assert m["skipped"] == {"empty_text": 1, "non_string_text": 1, "invalid_utf8": 1}
    assert m["pile_set_names"]["Wikipedia (en)"]["documents"] == 1

    para = prep(tmp_path, "para", inputs=[str(tmp_path / "book.txt")], tokenizer=demo_tokenizer, workers=1,
                txt_mode="paragraph")
    assert all_tokens(para) == [sp.encode(t) + [0] for t in ("A plain text book.", "Its second paragraph.")]


def test_nodes_split_inputs_and_manifests_merge(tmp_path, demo_corpus, demo_tokenizer, demo_shards):
    for rank in (0, 1):
        cli("--input", *demo_corpus, "--tokenizer", demo_tokenizer, "--output-prefix", tmp_path / "pile",
            "--num-nodes", 2, "--node-rank", rank, "--shards", 2, "--workers", 1)
    node_manifests = [tmp_path / "pile-node000.manifest.json", tmp_path / "pile-node001.manifest.json"]
    assert [load_manifest(p)["inputs"][0]["path"] for p in node_manifests] == demo_corpus
    out = tmp_path / "merged" / "all.manifest.json"
    r = cli("merge", "--output", out, *node_manifests)
    assert "4 shards" in r.stderr
    merged = load_manifest(out)
    single = load_manifest(demo_shards)
    assert len(merged["shards"]) == 4
    assert (merged["documents"], merged["tokens"]) == (single["documents"], single["tokens"])
    assert merged["pile_set_names"] == single["pile_set_names"]
    assert all_tokens(out) == all_tokens(demo_shards)
    # relative shard paths: the merged manifest points at the node outputs from its own directory
    assert json.loads(out.read_text())["shards"][0]["prefix"].startswith("../")


def test_merge_refuses_other_vocabularies(tmp_path, demo_shards):
    other = json.loads(Path(demo_shards).read_text())
    other["tokenizer"]["identity"] = "sentencepiece:sha256:another"
    other["shards"] = [{**s, "prefix": str(Path(demo_shards).parent / s["prefix"]) + "-x"}
                       for s in other["shards"]]
    other_path = tmp_path / "other.manifest.json"
    other_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="other.manifest.json: tokenizer"):
        merge_manifests([demo_shards, other_path], tmp_path / "m.manifest.json")
    with pytest.raises(ValueError, match="already listed"):
        merge_manifests([demo_shards, demo_shards], tmp_path / "m.manifest.json")


def test_inspect_prints_counts_and_decodes(demo_shards, demo_corpus):
    r = cli("inspect", demo_shards, "--samples", 1, "--chars", 40)
    first = read_jsonl_zst(demo_corpus[0])[0]["text"]
    m = load_manifest(demo_shards)
    assert f"total: {m['documents']} documents, {m['tokens']} tokens" in r.stdout
    assert repr(first[:40]) in r.stdout
    prefix = m["shards"][0]["prefix"]
    r = cli("inspect", prefix, "--samples", 0)
    assert f"{m['shards'][0]['documents']} documents" in r.stdout


def test_rerun_of_a_finished_job_is_a_no_op(tmp_path, demo_corpus, demo_tokenizer):
    kw = dict(inputs=[demo_corpus[1]], tokenizer=demo_tokenizer, workers=1, max_documents=20)
    man = prep(tmp_path, "once", **kw)
    before = (man.read_bytes(), shard_bytes(man))
    r = cli("--input", demo_corpus[1], "--tokenizer", demo_tokenizer, "--output-prefix", tmp_path / "once",
            "--workers", 1, "--max-documents", 20)
    assert "already complete" in r.stderr
    assert (man.read_bytes(), shard_bytes(man)) == before


def test_bad_arguments_are_clear(tmp_path, demo_tokenizer):
    r = cli("--input", tmp_path / "nothing*.jsonl", "--tokenizer", demo_tokenizer, "--output-prefix",
            tmp_path / "o", check=False)
    assert r.returncode == 2 and "no input files match" in r.stderr
    (tmp_path / "data.csv").write_text("a,b\n")
    r = cli("--input", tmp_path / "data.csv", "--tokenizer", demo_tokenizer, "--output-prefix",
            tmp_path / "o", check=False)
    assert r.returncode == 2 and "data.csv: unsupported input type" in r.stderr


def test_flat_output_matches_sizes(demo_shards):
    # Documents are stored back to back: the flat token view equals the concatenation of documents.
    m = load_manifest(demo_shards)
    ds = MMapIndexedDataset(m["shards"][1]["prefix"])
    assert np.array_equal(np.asarray(ds.tokens), np.concatenate([ds[i] for i in range(len(ds))]))


def test_multi_frame_zst_and_plain_jsonl(tmp_path, demo_corpus, demo_tokenizer):
    records = read_jsonl_zst(demo_corpus[1])[:30]
    lines = [json.dumps(r).encode() for r in records]
    cctx = zstandard.ZstdCompressor()
    # Three independent frames back to back, the way some tools write large files.
    frames = [cctx.compress(b"\n".join(lines[a:b]) + b"\n") for a, b in ((0, 10), (10, 11), (11, 30))]
    (tmp_path / "multi.jsonl.zst").write_bytes(b"".join(frames))
    (tmp_path / "plain.jsonl").write_bytes(b"\n".join(lines))
    a = prep(tmp_path, "a", inputs=[str(tmp_path / "multi.jsonl.zst")], tokenizer=demo_tokenizer, workers=1)
    b = prep(tmp_path, "b", inputs=[str(tmp_path / "plain.jsonl")], tokenizer=demo_tokenizer, workers=1)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer)
    expected = [sp.encode(r["text"]) + [0] for r in records]
    assert all_tokens(a) == expected == all_tokens(b)


def test_rwkv_world_shards_are_int32_and_match_the_rwkv_package(tmp_path, demo_corpus):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from data_prep.tokenizer import world_vocab_path

    man = prep(tmp_path, "world", inputs=[demo_corpus[0]], tokenizer="rwkv-world", workers=2, shards=2,
               max_documents=12)
    ref = TRIE_TOKENIZER(str(world_vocab_path()))
    records = read_jsonl_zst(demo_corpus[0])[:12]
    assert all_tokens(man) == [ref.encode(r["text"]) + [0] for r in records]
    m = load_manifest(man)
    assert m["dtype"] == "int32" and m["tokenizer"]["vocab_size"] == 65536
    assert MMapIndexedDataset(m["shards"][0]["prefix"]).dtype == np.int32
