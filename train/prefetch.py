"""Read micro-batches ahead on a background thread, so the GPU never waits for the host.

Building a batch is host work: gathering `micro_batch` windows out of memory-mapped shards (a page
fault to the filesystem for every cold window), stacking them into one int64 array, checking them.
Done inline it sits between two training steps with the GPU idle. `BatchPrefetcher` runs `fn(k)`
for the next `depth` micro-batch numbers on one worker thread while the current step computes,
and on CUDA pins each batch (page-locked memory), so the host-to-device copy can be asynchronous
(`non_blocking=True`) instead of a staged, synchronous one.

The result is exactly what calling `fn` directly gives, in the same order: the prefetcher only
changes *when* `fn(k)` runs, never which k. Asking for a k other than the next one (a resume, a
skipped step) drops what was read ahead and starts again from k. An exception in `fn(k)` is raised
by `get(k)`, not earlier.

    batches = BatchPrefetcher(lambda k: data.batch(k // ga, k % ga, rank, world, mb, ga), device)
    batch = batches.get(step * ga + micro)  # on `device`
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

BatchFn = Callable[[int], "np.ndarray | torch.Tensor"]


def pins_memory(device: torch.device) -> bool:
    """Pin only for a CUDA device that exists: pinning needs the CUDA driver, and on CPU it would
    only cost a copy."""
    return device.type == "cuda" and torch.cuda.is_available()


class BatchPrefetcher:
    def __init__(self, fn: BatchFn, device: torch.device | str, depth: int = 2):
        if depth < 1:
            raise ValueError(f"BatchPrefetcher: depth must be at least 1, got {depth}")
        self.fn = fn
        self.device = torch.device(device)
        self.depth = depth
        self.pin = pins_memory(self.device)
        # One worker: fn runs on one thread at a time, in k order, as it would inline (the data
        # reader needs no locks, and a failure shows up at the first bad k).
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
        self._ahead: OrderedDict[int, Future[torch.Tensor]] = OrderedDict()

    def _host(self, k: int) -> torch.Tensor:
        """fn(k) as a CPU tensor, pinned when the copy to the device can then be asynchronous."""
        batch = self.fn(k)
        t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        return t.pin_memory() if self.pin and not t.is_pinned() else t

    def _submit(self, k: int) -> None:
        if k not in self._ahead:
            assert self._pool is not None
            self._ahead[k] = self._pool.submit(self._host, k)

    def get(self, k: int) -> torch.Tensor:
        """Micro-batch k on the device; schedules k+1 .. k+depth before waiting for k."""
        if self._pool is None:
            raise RuntimeError("BatchPrefetcher: get() after close()")
        if next(iter(self._ahead), k) != k:  # not the next one in line: what was read ahead is stale
            self._drop()
        self._submit(k)
        for j in range(k + 1, k + 1 + self.depth):
            self._submit(j)
        host = self._ahead.pop(k).result()
        # From pinned memory the copy is queued on the current stream and the host goes on at once;
        # torch's pinned-memory allocator keeps `host` alive until the copy has run.
        return host.to(self.device, non_blocking=self.pin)

    def _drop(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        for fut in self._ahead.values():  # one may be running: let it finish before fn is called again
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - a stale batch's error is not this caller's
                    pass
        self._ahead.clear()

    def close(self) -> None:
        """Stop the worker; batches read ahead are dropped."""
        if self._pool is not None:
            self._drop()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
