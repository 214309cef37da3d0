"""Training throughput of our RWKV-4 against transformers' RwkvForCausalLM on CPU, side by side.

One training step = forward, cross-entropy on next-token targets, backward (the optimizer step is
left out: it is the same for both models). Each model runs in fp32 and in bf16; bf16 means bf16
weights and activations (the module as DeepSpeed's bf16 mode holds it), no autocast. MFU is the
achieved model FLOP/s (ModelConfig.flops_per_token x tokens/s) over this machine's matmul peak for
that dtype, measured in the same run with a large torch.matmul.

    python bench/model.py                      # 169m, ctx 1024, batch 1
    python bench/model.py --preset tiny --ctx 256 --steps 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import ModelConfig  # noqa: E402
from train.model import RWKV  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    """FLOP/s of an n x n x n torch.matmul, best of `reps` after one warmup."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import RwkvConfig, RwkvForCausalLM

    hf_cfg = RwkvConfig(
        vocab_size=cfg.vocab_size,
        context_length=cfg.ctx_len,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        attention_hidden_size=cfg.dim_att,
        intermediate_size=cfg.dim_ffn,
        layer_norm_epsilon=cfg.layer_norm_eps,
        rescale_every=0,
        tie_word_embeddings=False,
    )
    model = RwkvForCausalLM(hf_cfg)

    class Logits(torch.nn.Module):  # same call signature as ours: idx -> logits
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.inner(idx, use_cache=False).logits

    return Logits()


def step_time(model: torch.nn.Module, idx: torch.Tensor, steps: int, warmup: int) -> float:
    """Median seconds of one training step (forward + loss + backward)."""
    vocab = None
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(idx[:, :-1])
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), idx[:, 1:].reshape(-1))
        loss.backward()
        for p in model.parameters():
            p.grad = None
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run(name: str, build: Callable[[], torch.nn.Module], dtype: torch.dtype, args, cfg, peak: float) -> float:
    torch.manual_seed(0)
    model = build().to(dtype).train()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx + 1))
    seconds = step_time(model, idx, args.steps, args.warmup)
    tokens_per_s = args.batch * args.ctx / seconds
    mfu = tokens_per_s * cfg.flops_per_token(args.ctx) / peak
    print(
        f"{name:<14} {dtype_name(dtype):<9} {seconds:8.2f} s/step {tokens_per_s:9.1f} tokens/s"
        f"  MFU {100 * mfu:5.1f}%",
        flush=True,
    )
    del model
    return tokens_per_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="169m")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model and dtype (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--wkv-backend", default="auto", help="auto | cpu | reference")
    parser.add_argument("--skip-hf", action="store_true", help="only our model (no baseline, no ratio)")
    args = parser.parse_args(argv)

    cfg = ModelConfig.from_preset(args.preset, ctx_len=args.ctx, wkv_backend=args.wkv_backend)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    print(
        f"preset {args.preset}: {cfg.n_params() / 1e6:.1f}M params, ctx {args.ctx}, batch {args.batch}, "
        f"{cfg.flops_per_token(args.ctx) / 1e9:.3f} GFLOP/token (fwd+bwd); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}",
        flush=True,
    )
    peaks = {}
    for dtype in dtypes:
        peaks[dtype] = matmul_peak(dtype)
        print(
            f"matmul peak    {dtype_name(dtype):<9} {peaks[dtype] / 1e9:8.1f} GFLOP/s",
            flush=True,
        )

    ours: dict[torch.dtype, float] = {}
    theirs: dict[torch.dtype, float] = {}
    for dtype in dtypes:
        ours[dtype] = run("ours", lambda: RWKV(cfg), dtype, args, cfg, peaks[dtype])
        if not args.skip_hf:
            theirs[dtype] = run("transformers", lambda: hf_model(cfg), dtype, args, cfg, peaks[dtype])
    if theirs:
        for dtype in dtypes:
            print(f"ratio ours/transformers {dtype_name(dtype)}: {ours[dtype] / theirs[dtype]:.2f}x")
        best_ours, best_theirs = max(ours.values()), max(theirs.values())
        print(f"ratio best ours / best transformers: {best_ours / best_theirs:.2f}x (target >= 3x)")
    if torch.bfloat16 in ours:
        bf16_mfu = ours[torch.bfloat16] * cfg.flops_per_token(args.ctx) / peaks[torch.bfloat16]
        print(f"ours bf16 MFU: {100 * bf16_mfu:.1f}% (target >= 40%)")


if __name__ == "__main__":
    main()
