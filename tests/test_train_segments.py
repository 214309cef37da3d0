"""Real DeepSpeed training of windows in segments: 2 processes over gloo (torchrun), ZeRO-2, fp32, the
tiny model on the demo shards, seq_len = 4 x ctx_len with full BPTT. The run trains (the loss falls),
reports validation loss by position, and a run SIGKILLed in the middle of a window resumes at the
window boundary (the last checkpoint's step) and continues exactly as the uninterrupted run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_train_distributed import (
    EVERY,
    PAUSED_RUN,
    STEPS,
    _assert_same_metrics,
    _cmd,
    _complete,
    _env,
    _kill_tree,
    _records,
    _run,
    _start,
    _train_records,
)

pytestmark = pytest.mark.slow

CTX, SEQ = 32, 128
SEGMENTED = [f"train.ctx_len={CTX}", f"train.seq_len={SEQ}", "train.zero_stage=2",
             f"optim.decay_tokens={STEPS * 4 * 2 * SEQ}"]


def _kill_mid_window(cmd: list[str], log: Path, run_dir: Path, window: int, segment: int, ckpt: int) -> None:
    """Start a run that pauses on rank 0 after segment `segment` of its `window`-th window, wait for the
    pause and checkpoint `ckpt`, then SIGKILL all its processes."""
    i = cmd.index("-m", cmd.index("--nproc_per_node"))
    cmd = [*cmd[:i], str(PAUSED_RUN), "train", *cmd[i + 2 :]]
    flag = run_dir.parent / "paused.flag"
    proc = _start(cmd, log, env={**_env(), "RWKV_TEST_PAUSE_IN_WINDOW": f"{window},{segment}",
                                 "RWKV_TEST_PAUSE_FLAG": str(flag)})
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if flag.exists() and _complete(run_dir, ckpt):
                _kill_tree(proc)
                return
            if proc.poll() is not None:
                pytest.fail(f"run ended (exit {proc.returncode}) before the kill:\n{log.read_text()[-4000:]}")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    pytest.fail(f"run did not pause in window {window} in time:\n{log.read_text()[-4000:]}")


def test_segmented_training_runs_and_resumes_mid_window_exactly(demo_shards, tmp_path):
    ref = tmp_path / "ref"
    text = _run(_cmd(2, ref, demo_shards, *SEGMENTED), tmp_path / "ref.log")
    assert f"window {SEQ} = 4 segments of ctx_len {CTX}" in text and "bptt full" in text
    recs = _train_records(ref)
    assert sorted(recs) == list(range(1, STEPS + 1))
    assert all(r["tokens"] == s * 4 * 2 * SEQ for s, r in recs.items())
    first, last = recs[1]["loss"], sum(recs[s]["loss"] for s in (10, 11, 12)) / 3
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} did not fall"
    vals = [r for r in _records(ref) if "val_loss" in r]
    assert len(vals) == 2 and vals[1]["val_loss"] < vals[0]["val_loss"]
    by_pos = vals[-1]["val_loss_by_position"]
    assert list(by_pos) == ["0-8", "8-32", "32-128"]
    # the bucket means average to the overall loss (equal-width buckets weighted by their widths)
    overall = (by_pos["0-8"] * 8 + by_pos["8-32"] * 24 + by_pos["32-128"] * 96) / SEQ
    assert abs(overall - vals[-1]["val_loss"]) < 1e-9
    resolved = (ref / "config.resolved.yaml").read_text()
    assert f"seq_len: {SEQ}" in resolved and "bptt: full" in resolved

    # Killed inside window 10 (after its 2nd segment): the last checkpoint is step 8.
    run_dir = tmp_path / "killed"
    _kill_mid_window(_cmd(2, run_dir, demo_shards, *SEGMENTED, "train.steps=1000"), tmp_path / "killed.log",
                     run_dir, window=2 * EVERY + 2, segment=2, ckpt=2 * EVERY)
    assert max(_train_records(run_dir)) == 2 * EVERY + 1  # step 10 never finished
    text = _run(_cmd(2, run_dir, demo_shards, *SEGMENTED), tmp_path / "resumed.log")
    assert f"resumed from {run_dir / 'checkpoints' / f'step{2 * EVERY}'} at step {2 * EVERY}" in text
    _assert_same_metrics(ref, run_dir)
    for a, b in zip(_records(ref), _records(run_dir), strict=True):
        assert a.get("val_loss_by_position") == b.get("val_loss_by_position")
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == STEPS


def test_rwkv7_segments_under_zero3(demo_shards, tmp_path):
    """RWKV-7 with full BPTT under ZeRO-3: the stateful forward goes through the engine, whose hooks
    gather each module's partitioned parameters, and the loss falls. A NaN injected in step 3's window
    (every segment of rank 0's first window) skips that step, as without segments."""
    run_dir = tmp_path / "rwkv7"
    text = _run(_cmd(2, run_dir, demo_shards, *SEGMENTED, "model.preset=rwkv7-tiny", "train.zero_stage=3",
                     "train.steps=8", "eval.every=4", "checkpoint.every=0", "train.fault_nan_steps=[3]"),
                tmp_path / "rwkv7.log")
    assert "ZeRO stage 3" in text and f"window {SEQ} = 4 segments" in text
    assert "non-finite loss at step 3" in text
    assert any(r.get("skipped_nonfinite") for r in _records(run_dir) if r["step"] == 3)
    recs = _train_records(run_dir)
    assert sorted(recs) == [1, 2, 4, 5, 6, 7, 8]
    assert recs[8]["loss"] < recs[1]["loss"] - 0.5 and all(r["grad_norm"] > 0 for r in recs.values())
    vals = [r for r in _records(run_dir) if "val_loss" in r]
    assert len(vals) == 2 and set(vals[0]["val_loss_by_position"]) == {"0-8", "8-32", "32-128"}
