"""WKV-7 CUDA kernel timing: forward and backward at a model-like shape (needs a CUDA device).

    python bench/wkv7_gpu.py [--batch 8 --seq 4096 --heads 32 --dtype bf16 --repeats 5]

Prints the median forward and backward times, tokens per second through one layer's WKV, and the peak
memory PyTorch allocated (the inputs, the outputs, and the kernels' scratch: state checkpoints every 16
steps and sa per step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wkv7 import make_inputs  # noqa: E402  (bench/wkv7.py: model-range inputs)

from train.wkv7 import HEAD_SIZE, load_extension, wkv7  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/wkv7_gpu.py needs a CUDA device")
    load_extension("cuda")  # the one-off JIT build is not part of the timing

    B, T, H = args.batch, args.seq, args.heads
    inputs = [x.detach().cuda().requires_grad_() for x in make_inputs(B, T, H, DTYPES[args.dtype])]
    gy = torch.randn(B, T, H, HEAD_SIZE, device="cuda").to(DTYPES[args.dtype])
    gs = torch.zeros(B, H, HEAD_SIZE, HEAD_SIZE, device="cuda")
    fwd, bwd = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats + 1):  # the first run warms up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y, s = wkv7(*inputs[:6], state=inputs[6], backend="cuda")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        torch.autograd.grad((y, s), inputs, (gy, gs))
        torch.cuda.synchronize()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    t_f, t_b = statistics.median(fwd[1:]), statistics.median(bwd[1:])
    print(f"WKV-7 on {torch.cuda.get_device_name()}, B={B} T={T} H={H} N={HEAD_SIZE} {args.dtype}")
    print(f"  forward {t_f * 1e3:8.2f} ms, backward {t_b * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"  {B * T / (t_f + t_b) / 1e6:.2f} M tokens/s through fwd+bwd of one layer's WKV")
    print(f"  peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
