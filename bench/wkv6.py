"""WKV-6 forward+backward on CPU: the compiled CPU twin against the pure-PyTorch reference, side by side.

    python bench/wkv6.py [--batch 2 --seq 512 --heads 8 --dtype fp32 --repeats 3 --threads N]

Prints the median time of each, the ratio (reference / twin; target >= 20x) and their largest
difference, so the speed is never bought with a wrong answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.wkv6 import HEAD_SIZE, load_extension, wkv6, wkv6_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = 20.0


def make_inputs(B: int, T: int, H: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """r, w, k, v (B, T, H, N), u (H, N) and an initial state, all requiring grad; decays exp(-exp(w))
    with w uniform in [-8, 3], from ~2e-9 to ~0.9997 as RWKV-6's trained decays span."""
    g = torch.Generator().manual_seed(0)
    shape = (B, T, H, HEAD_SIZE)

    def randn(*s):
        return torch.randn(*s, generator=g)

    r, k, v = randn(*shape), randn(*shape), randn(*shape)
    w = -8.0 + 11.0 * torch.rand(*shape, generator=g)
    u = randn(H, HEAD_SIZE) * 0.5
    xs = [x.to(dtype) for x in (r, w, k, v, u)]
    state = randn(B, H, HEAD_SIZE, HEAD_SIZE) * 0.3
    return [x.requires_grad_() for x in (*xs, state)]


def fwd_bwd(fn, inputs, gy, gs) -> tuple[float, torch.Tensor, tuple]:
    start = time.perf_counter()
    y, s = fn(*inputs[:5], state=inputs[5])
    grads = torch.autograd.grad((y, s), inputs, (gy, gs))
    return time.perf_counter() - start, y.detach(), grads


def interleaved(ref, twin, inputs, gy, gs, repeats: int) -> tuple[list, list]:
    """Alternates the two (after a warm-up of each) so both see the same load on a shared machine."""
    fwd_bwd(ref, inputs, gy, gs)
    fwd_bwd(twin, inputs, gy, gs)
    ref_runs, twin_runs = [], []
    for _ in tqdm(range(repeats), desc="timing", leave=False):
        ref_runs.append(fwd_bwd(ref, inputs, gy, gs))
        twin_runs.extend(fwd_bwd(twin, inputs, gy, gs) for _ in range(5))
    return ref_runs, twin_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of the reference (the twin gets 5 per run, interleaved)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch/OpenMP threads for both (default: torch's)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.batch, args.seq, args.heads, dtype)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(args.batch, args.seq, args.heads, HEAD_SIZE, generator=g).to(dtype)
    gs = torch.randn(args.batch, args.heads, HEAD_SIZE, HEAD_SIZE, generator=g)
    load_extension("cpu")  # the one-off JIT build is not part of the timing

    print(
        f"WKV-6 fwd+bwd on CPU, B={args.batch} T={args.seq} H={args.heads} N={HEAD_SIZE} {args.dtype}, "
        f"torch threads={torch.get_num_threads()}"
    )
    twin = lambda *x, state: wkv6(*x, state=state, backend="cpu")  # noqa: E731
    ref_runs, twin_runs = interleaved(wkv6_reference, twin, inputs, gy, gs, args.repeats)
    t_ref = statistics.median(r[0] for r in ref_runs)
    t_twin = statistics.median(r[0] for r in twin_runs)
    (_, y_ref, g_ref), (_, y_twin, g_twin) = ref_runs[-1], twin_runs[-1]
    print(f"  reference (PyTorch loop over T): {t_ref * 1e3:9.1f} ms (median of {len(ref_runs)})")
    print(f"  CPU twin (wkv6_math.h):          {t_twin * 1e3:9.1f} ms (median of {len(twin_runs)})")
    y_diff = ((y_twin.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
    g_diff = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for a, b in zip(g_twin, g_ref, strict=True)
    )
    print(f"  max relative |y diff| {y_diff:.2e}; max relative gradient diff {g_diff:.2e}")
    ratio = t_ref / t_twin
    print(f"  speedup: {ratio:.1f}x (target >= {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
