"""WKV forward+backward on CPU: the compiled CPU twin against the pure-PyTorch reference, side by side.

    python bench/wkv.py [--batch 8 --seq 512 --channels 768 --dtype fp32 --repeats 3 --threads N]

Prints the median time of each, the ratio (reference / extension; target >= 20x) and their largest
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

from train.wkv import load_extension, wkv, wkv_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(B: int, T: int, C: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    time_decay = torch.linspace(-5.0, 3.0, C)  # RWKV-4's initial decay range
    time_first = torch.randn(C, generator=g) * 0.5 - 1.0
    k = (torch.randn(B, T, C, generator=g) * 5).to(dtype)
    v = torch.randn(B, T, C, generator=g).to(dtype)
    return [x.requires_grad_() for x in (time_decay, time_first, k, v)]


def fwd_bwd(fn, inputs: list[torch.Tensor], gy: torch.Tensor) -> tuple[float, torch.Tensor, tuple]:
    start = time.perf_counter()
    y = fn(*inputs)
    grads = torch.autograd.grad(y, inputs, gy)
    return time.perf_counter() - start, y.detach(), grads


def interleaved(ref, ext, inputs, gy, repeats: int) -> tuple[list, list]:
    """Alternates the two (after a warm-up of each) so both see the same load on a shared machine."""
    fwd_bwd(ref, inputs, gy)
    fwd_bwd(ext, inputs, gy)
    ref_runs, ext_runs = [], []
    for _ in tqdm(range(repeats), desc="timing", leave=False):
        ref_runs.append(fwd_bwd(ref, inputs, gy))
        ext_runs.extend(fwd_bwd(ext, inputs, gy) for _ in range(5))
    return ref_runs, ext_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--channels", type=int, default=768)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of the reference (the extension gets 5 per run, interleaved)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch/OpenMP threads for both (default: torch's)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.batch, args.seq, args.channels, dtype)
    gy = torch.randn(args.batch, args.seq, args.channels, generator=torch.Generator().manual_seed(1)).to(
        dtype
    )
    load_extension("cpu")  # the one-off JIT build is not part of the timing

    print(
        f"WKV fwd+bwd on CPU, B={args.batch} T={args.seq} C={args.channels} {args.dtype}, "
        f"torch threads={torch.get_num_threads()}"
    )
    ref_runs, ext_runs = interleaved(
        wkv_reference, lambda *x: wkv(*x, backend="cpu"), inputs, gy, args.repeats
    )
    t_ref = statistics.median(r[0] for r in ref_runs)
    t_ext = statistics.median(r[0] for r in ext_runs)
    (_, y_ref, g_ref), (_, y_ext, g_ext) = ref_runs[-1], ext_runs[-1]
    print(f"  reference (PyTorch loop over T): {t_ref * 1e3:9.1f} ms (median of {len(ref_runs)})")
    print(f"  CPU extension (wkv4_math.h):      {t_ext * 1e3:9.1f} ms (median of {len(ext_runs)})")
    diffs = [(y_ext.float() - y_ref.float()).abs().max().item()]
    diffs += [
        ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for a, b in zip(g_ext, g_ref, strict=True)
    ]
    print(f"  max |y diff| {diffs[0]:.2e}; max relative gradient diff {max(diffs[1:]):.2e}")
    print(f"  speedup: {t_ref / t_ext:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
