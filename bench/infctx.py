"""Unlimited-context training: peak memory and speed of a window trained in segments (train/segments.py).

Each configuration runs in a fresh subprocess (one thread, the tiny model, the CPU WKV twin, fp32,
AdamW, glibc's mmap threshold fixed: see MALLOC_ENV), so its peak memory is the process' own
high-water mark (ru_maxrss) with nothing left over from another configuration. A training step =
forward and backward of one window + optimizer step.

Printed per configuration: peak RSS, the step's own peak (peak RSS minus the RSS after the model,
optimizer and a warm-up step of 1 segment; the interpreter, torch and the weights are in the latter),
tokens/s; then the ratios:
- memory: segmented step peak at seq_len S / at the shortest S (flat in S at fixed ctx_len: ~1), and
  one-piece (ctx_len = seq_len) step peak / segmented where one piece fits;
- speed: segmented tokens/s / one-piece tokens/s at equal total tokens (the same windows).

    python bench/infctx.py [--ctx 1024] [--seqs 4096,16384,65536] [--one-piece-max 16384]
                           [--n-layer 4] [--n-embd 128] [--vocab 2048] [--steps 2] [--default-malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# glibc's malloc raises its mmap threshold as large blocks are freed, after which blocks of a segment's
# size come from the heap, which fragments: the RSS high-water mark then creeps up with the number of
# segments although the live memory does not (seen here: step peak 145 -> 215 MiB from 4 to 16
# segments; 95 -> 95 MiB with a fixed threshold). A fixed threshold measures the memory the step uses;
# every configuration runs with it (GPU memory is managed by PyTorch's caching allocator instead).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_mib() -> float:
    """This process' current resident set (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from train.config import ModelConfig
    from train.loss import lm_loss
    from train.model import RWKV
    from train.segments import train_window

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab, ctx_len=args.seq,
                      wkv_backend="cpu", grad_cp=args.grad_cp)
    model = RWKV(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    n = args.seq // args.ctx

    def step(seq: int, ctx: int) -> None:
        tokens = torch.randint(0, args.vocab, (1, seq + 1), generator=g)
        segs = seq // ctx
        train_window(model.forward_with_state, tokens[:, :-1], tokens[:, 1:], ctx, args.bptt,
                     lambda logits, t: lm_loss(logits, t, True),
                     lambda obj: (obj / segs).backward(), grad_scale=1.0 / segs)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(min(args.ctx, 256), min(args.ctx, 256))  # warm-up: kernels built, optimizer state allocated
    base = rss_mib()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(args.seq, args.ctx)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seq": args.seq, "ctx": args.ctx, "bptt": args.bptt, "segments": n,
                      "grad_cp": args.grad_cp, "base_mib": base, "peak_mib": peak_mib(),
                      "step_mib": peak_mib() - base, "tokens_per_s": args.steps * args.seq / seconds}))


def run(args: argparse.Namespace, seq: int, ctx: int, bptt: str, grad_cp: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--seq", str(seq), "--ctx", str(ctx), "--bptt", bptt,
           "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--vocab", str(args.vocab),
           "--steps", str(args.steps)] + (["--grad-cp"] if grad_cp else [])
    env = dict(os.environ) if args.default_malloc else {**os.environ, **MALLOC_ENV}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    label = "one piece" if r["segments"] == 1 else f"{r['segments']} x {ctx}, {bptt}"
    label += " + grad_cp" if grad_cp else ""
    print(f"  seq {seq:>6}  {label:<28} peak RSS {r['peak_mib']:8.0f} MiB  "
          f"step peak {r['step_mib']:8.0f} MiB  {r['tokens_per_s']:8.0f} tokens/s", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--bptt", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--grad-cp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=int, default=1024, help="segment length (train.ctx_len)")
    ap.add_argument("--seqs", default="4096,16384,65536", help="window lengths (train.seq_len)")
    ap.add_argument("--one-piece-max", type=int, default=16384, help="longest window also run in one piece")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's mmap threshold dynamic (RSS then includes heap fragmentation)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    seqs = [int(s) for s in args.seqs.split(",")]
    malloc = "glibc default malloc" if args.default_malloc else "fixed mmap threshold"
    print(f"RWKV-4 {args.n_layer} x {args.n_embd}, vocab {args.vocab}, micro-batch 1, fp32, CPU twin, "
          f"1 thread, {malloc}; ctx_len {args.ctx}; {args.steps} timed steps per configuration")
    results: dict[tuple, dict] = {}
    for seq in seqs:
        for bptt in ("full", "truncated"):
            results[(seq, bptt)] = run(args, seq, args.ctx, bptt)
        if seq <= args.one_piece_max:
            results[(seq, "one")] = run(args, seq, seq, "full")
            results[(seq, "one+cp")] = run(args, seq, seq, "full", grad_cp=True)
    print("\nmemory (step peak):")
    first = results[(seqs[0], "full")]["step_mib"]
    for seq in seqs:
        full = results[(seq, "full")]["step_mib"]
        line = f"  seq {seq:>6}: segmented (full) / segmented at seq {seqs[0]}: {full / first:5.2f}"
        if (seq, "one") in results:
            line += f";  one piece / segmented: {results[(seq, 'one')]['step_mib'] / full:6.2f}"
        print(line)
    print("\nspeed (tokens/s, equal total tokens):")
    for seq in seqs:
        if (seq, "one") not in results:
            continue
        one = results[(seq, "one")]["tokens_per_s"]
        cp = results[(seq, "one+cp")]["tokens_per_s"]
        full = results[(seq, "full")]["tokens_per_s"]
        trunc = results[(seq, "truncated")]["tokens_per_s"]
        print(f"  seq {seq:>6}: truncated / one piece {trunc / one:5.2f};  "
              f"full / one piece {full / one:5.2f};  full / one piece with grad_cp {full / cp:5.2f}")


if __name__ == "__main__":
    main()
