"""train.prefetch: read-ahead changes when batches are built, never which ones or in what order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train.prefetch import BatchPrefetcher, pins_memory


class Recorder:
    """A batch function whose batch k is a function of k, recording each call and its thread."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0):
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.fail_at, self.delay = fail_at, delay
        self.called = threading.Condition()

    def __call__(self, k: int) -> np.ndarray:
        time.sleep(self.delay)
        if k == self.fail_at:
            raise ValueError(f"bad token in batch {k}")
        with self.called:
            self.calls.append(k)
            self.threads.add(threading.current_thread().name)
            self.called.notify_all()
        return np.arange(6, dtype=np.int64).reshape(2, 3) + 100 * k

    def wait_for(self, k: int, timeout: float = 5.0) -> bool:
        with self.called:
            return self.called.wait_for(lambda: k in self.calls, timeout)


def test_same_batches_in_the_same_order() -> None:
    fn = Recorder()
    with BatchPrefetcher(fn, "cpu", depth=3) as pf:
        got = [pf.get(k) for k in range(20)]
    for k, b in enumerate(got):
        assert b.dtype == torch.int64 and torch.equal(b, torch.from_numpy(Recorder()(k)))
    # each batch built once, in order, and never more than depth past the last one asked for (close()
    # may cancel some of those before they start)
    assert fn.calls == list(range(len(fn.calls))) and 20 <= len(fn.calls) <= 20 + 3


def test_reads_ahead_on_another_thread() -> None:
    fn = Recorder()
    with BatchPrefetcher(fn, "cpu", depth=2) as pf:
        pf.get(0)
        # Without asking for them, batches 1 and 2 get built while the caller "computes".
        assert fn.wait_for(2), fn.calls
        assert fn.calls == [0, 1, 2]
    assert fn.threads and threading.main_thread().name not in fn.threads


def test_overlaps_batch_building_with_compute() -> None:
    """Build 50 ms + compute 50 ms per step: inline 8 steps take >= 0.8 s; read ahead ~0.45 s."""
    fn = Recorder(delay=0.05)
    start = time.perf_counter()
    with BatchPrefetcher(fn, "cpu", depth=2) as pf:
        for k in range(8):
            pf.get(k)
            time.sleep(0.05)  # the training step
    assert time.perf_counter() - start < 0.7


def test_jumping_elsewhere_restarts_exactly() -> None:
    fn = Recorder()
    with BatchPrefetcher(fn, "cpu", depth=2) as pf:
        order = [0, 1, 2, 7, 8, 3, 3, 4]  # a skip ahead, a resume behind, a repeat
        got = [pf.get(k) for k in order]
    for k, b in zip(order, got, strict=True):
        assert torch.equal(b, torch.from_numpy(Recorder()(k)))


def test_errors_surface_at_their_batch() -> None:
    fn = Recorder(fail_at=3)
    with BatchPrefetcher(fn, "cpu", depth=2) as pf:
        for k in range(3):  # batch 3 fails on the worker while 1 and 2 are still good
            assert torch.equal(pf.get(k), torch.from_numpy(Recorder()(k)))
        with pytest.raises(ValueError, match="bad token in batch 3"):
            pf.get(3)
        assert torch.equal(pf.get(4), torch.from_numpy(Recorder()(4)))


def test_closed_and_bad_depth() -> None:
    pf = BatchPrefetcher(Recorder(), "cpu")
    pf.close()
    with pytest.raises(RuntimeError, match="after close"):
        pf.get(0)
    with pytest.raises(ValueError, match="depth"):
        BatchPrefetcher(Recorder(), "cpu", depth=0)


def test_pins_only_for_an_existing_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pins_memory(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pins_memory(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pins_memory(torch.device("cuda", 0)) and not pins_memory(torch.device("cpu"))


def test_token_windows_through_the_prefetcher(demo_shards: str) -> None:
    """The trainer's use: micro-batch k = step * grad_accum + micro of one rank, resumed mid-run."""
    from train.data import TokenWindows

    data = TokenWindows([Path(demo_shards)], ctx_len=32, val_documents=8)
    rank, world, mb, ga = 1, 2, 3, 2
    with BatchPrefetcher(data.micro_batches(rank, world, mb, ga), "cpu") as pf:
        for step in [5, 6, 7, 0, 1]:
            for micro in range(ga):
                assert torch.equal(pf.get(step * ga + micro), data.batch(step, micro, rank, world, mb, ga))
