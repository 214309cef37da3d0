"""Hugging Face datasets as prep inputs: save_to_disk directories, directories of parquet/arrow files,
and `hf:NAME[:CONFIG]:SPLIT` read offline from the cache. The token ids are checked against the same
texts given as a .jsonl file (another reader), and the output against the worker count and a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from data_prep.binidx import MMapIndexedDataset  # noqa: E402
from data_prep.manifest import load_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAUSED_RUN = Path(__file__).with_name("paused_run.py")
TOKENIZER = "rwkv-world"  # built in: no tokenizer to train, and it encodes any text
# Good rows, then the bad ones a dataset can hold: a null text and an empty one.
TEXTS = ["First document.", "Second one,\nover two lines.", None, "", "Ünïcode text 字 here."] + [
    f"Row number {i} of the dataset." for i in range(40)
]


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch) -> Path:
    """`datasets` caches under the test's own directory, never the user's ~/.cache."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # online unless a test says
        monkeypatch.delenv(var, raising=False)
    return home


def cli(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args), "--tokenizer", TOKENIZER,
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def prep(inputs: list, prefix: Path, *extra, env: dict[str, str] | None = None) -> dict:
    workers = () if "--workers" in extra else ("--workers", 1)  # 2 shared cores: no pool unless asked
    r = cli("--input", *inputs, "--output-prefix", prefix, *extra, *workers, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(Path(f"{prefix}.manifest.json").read_text())


def all_tokens(prefix: Path) -> list[list[int]]:
    out = []
    for shard in load_manifest(f"{prefix}.manifest.json")["shards"]:
        ds = MMapIndexedDataset(shard["prefix"])
        out += [ds[i].tolist() for i in range(len(ds))]
    return out


def shard_bytes(prefix: Path) -> list[bytes]:
    shards = load_manifest(f"{prefix}.manifest.json")["shards"]
    return [Path(s["prefix"] + suffix).read_bytes() for s in shards for suffix in (".bin", ".idx")]


def write_jsonl(path: Path, texts: list, key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path


def saved_dataset(root: Path, texts: list = TEXTS) -> Path:
    """A save_to_disk directory: the texts under `body`, something else under `text`."""
    ds = datasets.Dataset.from_dict({"body": texts, "text": [f"other {i}" for i in range(len(texts))]})
    ds.save_to_disk(str(root / "saved"))
    return root / "saved"


def parquet_dir(root: Path, texts: list = TEXTS) -> Path:
    """A directory of a dataset's parquet files; written out of name order, read in sorted order."""
    d = root / "pq"
    d.mkdir()
    ds = datasets.Dataset.from_dict({"text": texts})
    half = len(texts) // 2
    ds.select(range(half, len(texts))).to_parquet(str(d / "train-00001.parquet"))
    ds.select(range(half)).to_parquet(str(d / "train-00000.parquet"))
    return d


def test_saved_dataset_matches_jsonl(tmp_path):
    ref = prep([write_jsonl(tmp_path / "ref.jsonl", TEXTS, "body")], tmp_path / "ref", "--text-key", "body")
    m = prep([saved_dataset(tmp_path)], tmp_path / "hf", "--text-key", "body")
    assert all_tokens(tmp_path / "hf") == all_tokens(tmp_path / "ref")
    assert m["documents"] == len(TEXTS) - 2
    assert m["skipped"] == ref["skipped"] == {"empty_text": 1, "non_string_text": 1}
    (inp,) = m["inputs"]
    assert inp["records"] == len(TEXTS)
    src = inp["source"]
    assert src["type"] == "hf_disk" and src["path"] == str((tmp_path / "saved").resolve())
    assert src["rows"] == len(TEXTS) and src["fingerprint"]
    # --text-key picks the column: the default reads the other one.
    prep([tmp_path / "saved"], tmp_path / "other")
    assert all_tokens(tmp_path / "other") != all_tokens(tmp_path / "hf")
    assert load_manifest(tmp_path / "other.manifest.json")["documents"] == len(TEXTS)


@pytest.mark.parametrize("shards", [1, 3], ids=["chunk-parallel", "shard-parallel"])
def test_workers_byte_identical(tmp_path, shards):
    saved = saved_dataset(tmp_path)
    prep([saved], tmp_path / "w1", "--text-key", "body", "--workers", 1, "--shards", shards)
    prep([saved], tmp_path / "w2", "--text-key", "body", "--workers", 2, "--shards", shards)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")


def test_parquet_and_arrow_directories(tmp_path):
    prep([write_jsonl(tmp_path / "ref.jsonl", TEXTS)], tmp_path / "ref")
    m = prep([parquet_dir(tmp_path)], tmp_path / "pq")
    assert all_tokens(tmp_path / "pq") == all_tokens(tmp_path / "ref")
    assert [Path(i["path"]).name for i in m["inputs"]] == ["train-00000.parquet", "train-00001.parquet"]
    assert m["skipped"] == {"empty_text": 1, "non_string_text": 1}
    # The .arrow files of a saved dataset, given as a plain directory of files.
    saved = saved_dataset(tmp_path)
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    for f in saved.glob("*.arrow"):
        (arrows / f.name).write_bytes(f.read_bytes())
    prep([arrows], tmp_path / "arrow", "--text-key", "body")
    assert all_tokens(tmp_path / "arrow") == all_tokens(tmp_path / "ref")


def test_hf_name_offline_from_local_directory(tmp_path, hf_home):
    """hf:NAME:SPLIT with NAME a local dataset directory, offline: load_dataset reads it via its cache."""
    prep([write_jsonl(tmp_path / "ref.jsonl", TEXTS)], tmp_path / "ref")
    d = parquet_dir(tmp_path)
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    m = prep([f"hf:{d}:train"], tmp_path / "hub", "--workers", 2, "--shards", 2, env=offline)
    assert all_tokens(tmp_path / "hub") == all_tokens(tmp_path / "ref")
    assert m["skipped"] == {"empty_text": 1, "non_string_text": 1}
    src = m["inputs"][0]["source"]
    assert src == {**src, "type": "hf_hub", "name": str(d), "config": None, "split": "train",
                   "streaming": False, "rows": len(TEXTS)}
    assert any(hf_home.rglob("*.arrow")), "offline load_dataset should have prepared the split in the cache"
    # Online (the default) the same name is streamed; a local directory needs no network.
    m = prep([f"hf:{d}:train"], tmp_path / "stream", "--workers", 2, "--shards", 3)
    assert m["inputs"][0]["source"]["streaming"] is True
    assert all_tokens(tmp_path / "stream") == all_tokens(tmp_path / "ref")
    # A hub id that is not in the cache: one line naming the input, exit status 2.
    r = cli("--input", "hf:nobody/no-such-dataset:train", "--output-prefix", tmp_path / "x", env=offline)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("data_prep: error: hf:nobody/no-such-dataset:train:")


def test_bad_dataset_inputs_fail_in_one_line(tmp_path):
    saved = saved_dataset(tmp_path)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "dd"))
    cases = [
        (["hf:only-a-name"], "expected hf:NAME:SPLIT"),
        ([saved, "--text-key", "missing"], "has no column 'missing'"),
        ([tmp_path / "dd"], "a DatasetDict with splits ['train']"),
    ]
    for inputs, message in cases:
        r = cli("--input", *inputs, "--output-prefix", tmp_path / "bad", "--workers", 1)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr


def test_resume_after_sigkill(tmp_path):
    """A dataset input resumes by record number like a file: finished shards are kept, bytes match."""
    texts = [f"Document {i}: " + "words " * (i % 7) for i in range(400)]
    saved = saved_dataset(tmp_path, texts)
    args = ["--input", saved, "--text-key", "body", "--tokenizer", TOKENIZER, "--shards", 4,
            "--workers", 1, "--no-progress"]
    prep([saved], tmp_path / "ref", "--text-key", "body", "--shards", 4, "--workers", 1)
    prefix = tmp_path / "job"
    proc = subprocess.Popen([sys.executable, str(PAUSED_RUN), "data_prep", *map(str, args),
                             "--output-prefix", str(prefix)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "RWKV_TEST_PAUSE_AFTER_SHARDS": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_dir = Path(f"{prefix}.prep-state")
    deadline = time.time() + 120
    while len(list(state_dir.glob("shard_*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    m = prep([saved], prefix, "--text-key", "body", "--shards", 4, "--workers", 1)
    assert m["timings"]["resumed_shards"] == 2
    assert shard_bytes(prefix) == shard_bytes(tmp_path / "ref")
