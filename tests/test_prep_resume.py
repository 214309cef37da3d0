"""A prep job killed mid-way (SIGKILL or Ctrl-C) resumes to the same bytes without redoing finished shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.binidx import MMapIndexedDataset
from data_prep.pipeline import PrepSettings, run_prep

REPO = Path(__file__).resolve().parents[1]
PAUSED_RUN = Path(__file__).with_name("paused_run.py")
SHARDS = 12
# Copies of the corpus in the input: the job has real work left after the second shard.
COPIES = 6


@pytest.fixture(scope="module")
def corpus(demo_corpus, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("corpus_copies")
    paths = []
    for i in range(COPIES):
        for src in demo_corpus:
            copy = root / f"{i}_{Path(src).name}"  # a real copy: the job reads a file once
            shutil.copyfile(src, copy)
            paths.append(str(copy))
    return paths


def _start(inputs, tokenizer, prefix, workers=1) -> subprocess.Popen:
    return _popen([sys.executable, "-m", "data_prep", *_args(inputs, tokenizer, prefix, workers)])


def _start_paused(inputs, tokenizer, prefix, workers=1) -> subprocess.Popen:
    """The same job, stopping (to be killed) once two shards are finished: however fast the machine,
    the kill lands mid-job, not after the job has finished (see paused_run.py)."""
    env = {**os.environ, "RWKV_TEST_PAUSE_AFTER_SHARDS": "2"}
    return _popen([sys.executable, str(PAUSED_RUN), "data_prep", *_args(inputs, tokenizer, prefix, workers)],
                  env=env)


def _args(inputs, tokenizer, prefix, workers) -> list[str]:
    return ["--input", *inputs, "--tokenizer", tokenizer, "--output-prefix", str(prefix),
            "--shards", str(SHARDS), "--workers", str(workers), "--no-progress"]


def _popen(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    # Own process group: a kill reaches the job and its workers, as when a node or a batch job dies.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_two_shards(proc: subprocess.Popen, state_dir: Path) -> None:
    deadline = time.time() + 120
    while len(list(state_dir.glob("shard_*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.005)


def _shard_files(prefix: Path, k: int) -> tuple[Path, Path]:
    p = f"{prefix}_{k:05d}"
    return Path(p + ".bin"), Path(p + ".idx")


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "shard-per-worker"])
def test_resume_after_sigkill_is_byte_identical(tmp_path, corpus, demo_tokenizer, workers):
    run_prep(PrepSettings(inputs=corpus, tokenizer=demo_tokenizer, output_prefix=str(tmp_path / "ref"),
                          shards=SHARDS, workers=1, progress=False))
    prefix = tmp_path / "job"
    proc = _start_paused(corpus, demo_tokenizer, prefix, workers)
    _wait_for_two_shards(proc, Path(f"{prefix}.prep-state"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Path(f"{prefix}.manifest.json").exists(), "the job finished before it could be killed"

    finished = [k for k in range(SHARDS) if Path(f"{prefix}.prep-state/shard_{k:05d}.json").exists()]
    assert 2 <= len(finished) < SHARDS
    # No half-written shard can pass for a complete one: any pair that opens is the finished shard.
    for k in range(SHARDS):
        b, i = _shard_files(prefix, k)
        if b.exists() and i.exists():
            MMapIndexedDataset(f"{prefix}_{k:05d}")
            assert b.read_bytes() == _shard_files(tmp_path / "ref", k)[0].read_bytes()
        else:
            assert k not in finished
    kept_mtimes = {k: _shard_files(prefix, k)[0].stat().st_mtime_ns for k in finished}

    out, err = _start(corpus, demo_tokenizer, prefix, workers).communicate(timeout=300)
    assert f"{len(finished)} shard(s) kept from an earlier run" in err
    for k in range(SHARDS):
        for ours, ref in zip(_shard_files(prefix, k), _shard_files(tmp_path / "ref", k), strict=True):
            assert ours.read_bytes() == ref.read_bytes()
    assert {k: _shard_files(prefix, k)[0].stat().st_mtime_ns for k in finished} == kept_mtimes
    assert not Path(f"{prefix}.prep-state").exists()
    assert not list(tmp_path.glob("job*.tmp"))


def test_ctrl_c_stops_cleanly(tmp_path, corpus, demo_tokenizer):
    prefix = tmp_path / "job"
    proc = _start_paused(corpus, demo_tokenizer, prefix)
    _wait_for_two_shards(proc, Path(f"{prefix}.prep-state"))
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err
    assert not list(tmp_path.glob("job*.tmp"))
