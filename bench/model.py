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
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.hf_format_rwkv4 import to_hf_key  # noqa: E402
from train.config import ModelConfig  # noqa: E402
from train.model import RWKV  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MatmulPeak:
    """FLOP/s of an n x n x n torch.matmul in one dtype: the machine's practical peak."""

    def __init__(self, dtype: torch.dtype, n: int = 4096):
        self.n = n
        self.a = torch.randn(n, n, dtype=dtype)
        self.b = torch.randn(n, n, dtype=dtype)
        torch.matmul(self.a, self.b)  # warm up

    def measure(self, reps: int = 2) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(self.a, self.b)
            best = min(best, time.perf_counter() - t0)
        return 2 * self.n**3 / best


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


def train_step(model: torch.nn.Module, idx: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one training step: forward, fp32 cross entropy (as the trainer), backward."""
    t0 = time.perf_counter()
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0, float(loss.detach())


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_dtype(dtype: torch.dtype, args, cfg: ModelConfig) -> dict[str, float]:
    """Tokens/s of each model and the matmul peak, measured in alternation so that a change in the
    machine's load hits all of them alike. Both models get the same weights and the same batch."""
    torch.manual_seed(0)
    models = {"ours": RWKV(cfg)}
    if not args.skip_hf:
        hf = hf_model(cfg)
        hf.inner.load_state_dict({to_hf_key(k): v for k, v in models["ours"].state_dict().items()})
        models["transformers"] = hf
    for m in models.values():
        m.to(dtype).train()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx + 1))
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: list[float] = []
    peak_meter = MatmulPeak(dtype)
    losses: dict[str, float] = {}
    for m in models.values():
        for _ in range(args.warmup):
            train_step(m, idx)
    for _ in tqdm(range(args.steps), desc=f"{dtype_name(dtype)} steps", leave=False):
        peaks.append(peak_meter.measure())
        for name, m in models.items():
            seconds, losses[name] = train_step(m, idx)
            times[name].append(seconds)
    peak = median(peaks)
    print(f"matmul peak    {dtype_name(dtype):<9} {peak / 1e9:8.1f} GFLOP/s", flush=True)
    result = {"peak": peak}
    for name in models:
        seconds = median(times[name])
        tokens_per_s = args.batch * args.ctx / seconds
        mfu = tokens_per_s * cfg.flops_per_token(args.ctx) / peak
        print(
            f"{name:<14} {dtype_name(dtype):<9} {seconds:8.2f} s/step {tokens_per_s:9.1f} tokens/s"
            f"  MFU {100 * mfu:5.1f}%  loss {losses[name]:.4f}",
            flush=True,
        )
        result[name] = tokens_per_s
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="169m")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and dtype (median)")
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
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {dtype: bench_dtype(dtype, args, cfg) for dtype in dtypes}
    print(
        f"load average at the end {os.getloadavg()[0]:.1f} (figures are only meaningful on an idle machine)"
    )
    if not args.skip_hf:
        for dtype, r in results.items():
            print(f"ratio ours/transformers {dtype_name(dtype)}: {r['ours'] / r['transformers']:.2f}x")
        best_ours = max(r["ours"] for r in results.values())
        best_theirs = max(r["transformers"] for r in results.values())
        print(f"ratio best ours / best transformers: {best_ours / best_theirs:.2f}x (target >= 3x)")
    if torch.bfloat16 in results:
        r = results[torch.bfloat16]
        mfu = r["ours"] * cfg.flops_per_token(args.ctx) / r["peak"]
        print(f"ours bf16 MFU: {100 * mfu:.1f}% (target >= 40%)")


if __name__ == "__main__":
    main()
