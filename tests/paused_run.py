"""`python tests/paused_run.py MODULE ARGS...`: `python -m MODULE ARGS...` that stops at a set point
and waits there to be killed, so that a test's kill lands where the test means it to.

    RWKV_TEST_PAUSE_AFTER_STEP=N    train: rank 0 stops once it has logged step N's training record
                                    (the other ranks then wait in their next collective).
    RWKV_TEST_PAUSE_IN_WINDOW=N,K   train: rank 0 stops inside its N-th window (counted from 1 in this
                                    process), after the backward of its K-th segment, first touching
                                    the file $RWKV_TEST_PAUSE_FLAG if set (the kill then lands mid-window).
    RWKV_TEST_PAUSE_AFTER_SHARDS=N  data_prep: the process that writes a shard's state file stops
                                    once N shards are finished (each process that writes one after).

Without it a test that kills a job "after X, before Y" races the job: on a fast or idle machine the
job can get past Y, or finish, between the test seeing X and its kill. Nothing else changes: every
file written up to the pause is the job's own. A script, not `python -c`: data_prep's spawned
workers import the parent's main script again, and so get the same pause.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (this is tests/)


def _wait_to_be_killed() -> None:
    while True:
        time.sleep(3600)


if "RWKV_TEST_PAUSE_AFTER_STEP" in os.environ:
    from train import metrics

    _PAUSE_STEP = int(os.environ["RWKV_TEST_PAUSE_AFTER_STEP"])
    _write = metrics.MetricsWriter.write

    def _write_then_pause(self, record):
        _write(self, record)
        if self.enabled and "loss" in record and record["step"] >= _PAUSE_STEP:
            _wait_to_be_killed()

    metrics.MetricsWriter.write = _write_then_pause

if "RWKV_TEST_PAUSE_IN_WINDOW" in os.environ:
    from train import segments

    _WINDOW, _SEGMENT = (int(x) for x in os.environ["RWKV_TEST_PAUSE_IN_WINDOW"].split(","))
    _train_window = segments.train_window
    _windows = [0]

    def _train_window_with_pause(forward, idx, targets, ctx_len, bptt, loss_fn, backward, *args, **kwargs):
        _windows[0] += 1
        calls = [0]

        def backward_then_pause(objective):
            backward(objective)
            calls[0] += 1
            if _windows[0] == _WINDOW and calls[0] == _SEGMENT and os.environ.get("RANK", "0") == "0":
                if os.environ.get("RWKV_TEST_PAUSE_FLAG"):
                    Path(os.environ["RWKV_TEST_PAUSE_FLAG"]).touch()
                _wait_to_be_killed()

        return _train_window(forward, idx, targets, ctx_len, bptt, loss_fn, backward_then_pause,
                             *args, **kwargs)

    segments.train_window = _train_window_with_pause

if "RWKV_TEST_PAUSE_AFTER_SHARDS" in os.environ:
    from data_prep import pipeline

    _PAUSE_SHARDS = int(os.environ["RWKV_TEST_PAUSE_AFTER_SHARDS"])
    _write_json = pipeline.write_json_atomic

    def _write_json_then_pause(path, *args, **kwargs):
        _write_json(path, *args, **kwargs)
        path = Path(path)
        if path.parent.name.endswith(".prep-state") and path.name.startswith("shard_"):
            if len(list(path.parent.glob("shard_*.json"))) >= _PAUSE_SHARDS:
                _wait_to_be_killed()

    pipeline.write_json_atomic = _write_json_then_pause

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
