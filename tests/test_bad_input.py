"""Bad input through the real commands: each must stop before any work with one line naming the file
and the problem, exit status 2 and no traceback; and never write a result that drops data.

Every case runs the command line (`sys.executable -m ...`), as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/rwkv-no-such-dir"  # procfs refuses new entries, even to root


def run(module: str, *args, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The command failed the way a user should see it: status 2, one error line, no traceback."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "plain-file"
    f.write_text("not a directory\n")
    return f


# ------------------------------------------------------------------------------------ data_prep


def test_prep_refuses_an_unwritable_output_prefix_before_any_work(tmp_path, demo_corpus, demo_tokenizer):
    for prefix in (f"{UNWRITABLE}/out", a_file(tmp_path) / "out"):
        r = run("data_prep", "--input", *demo_corpus, "--tokenizer", demo_tokenizer,
                "--output-prefix", prefix, "--workers", "1", "--no-progress")
        line = error_line(r)
        assert f"{prefix}.manifest.json" in line and "cannot write the token shards" in line
        assert "tokenize" not in r.stderr  # stopped before the scan and tokenize passes


def test_prep_of_an_empty_file_writes_nothing_and_fails(tmp_path, demo_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    r = run("data_prep", "--input", empty, "--tokenizer", demo_tokenizer,
            "--output-prefix", tmp_path / "out", "--workers", "1", "--no-progress")
    line = error_line(r)
    assert "no documents written" in line and "hold no records" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no shard, no manifest, no state


def test_prep_of_only_bad_records_fails_with_the_skip_counts(tmp_path, demo_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": ""}\n{"text": 42}\n{"broken\n{"text": "  "}\n')  # 2 empty, 1 number, 1 json
    r = run("data_prep", "--input", bad, "--tokenizer", demo_tokenizer,
            "--output-prefix", tmp_path / "out", "--workers", "1", "--no-progress")
    line = error_line(r)
    assert "all 4 records read were skipped" in line
    assert "empty_text=2" in line and "non_string_text=1" in line and "invalid_json=1" in line
    assert not (tmp_path / "out.manifest.json").exists() and not (tmp_path / "out.bin").exists()


def test_manifest_records_the_largest_token_id(tmp_path, demo_corpus, demo_tokenizer):
    r = run("data_prep", "--input", *demo_corpus, "--tokenizer", demo_tokenizer,
            "--output-prefix", tmp_path / "d", "--shards", "2", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "d.manifest.json").read_text())
    # independent of our reader: the raw .bin files as uint16
    per_shard = [int(np.fromfile(tmp_path / f"d_{k:05d}.bin", dtype=np.uint16).max()) for k in range(2)]
    assert [s["max_token_id"] for s in m["shards"]] == per_shard
    assert m["max_token_id"] == max(per_shard)


def test_merge_refuses_an_unwritable_output(tmp_path, demo_shards):
    out = f"{UNWRITABLE}/merged.manifest.json"
    line = error_line(run("data_prep", "merge", "--output", out, demo_shards))
    assert out in line and "merged manifest" in line


def test_train_tokenizer_refuses_an_unwritable_model_prefix(tmp_path, demo_corpus):
    r = run("data_prep.train_tokenizer", "--input", demo_corpus[0], "--model-prefix", f"{UNWRITABLE}/tok")
    line = error_line(r)
    assert f"{UNWRITABLE}/tok.model" in line and "tokenizer model" in line


def test_train_tokenizer_on_an_empty_corpus_says_so(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b'{"text": ""}\n')
    line = error_line(run("data_prep.train_tokenizer", "--input", empty, "--model-prefix", tmp_path / "tok"))
    assert str(empty) in line and "no text to train on" in line
    assert not (tmp_path / "tok.model").exists()
