"""Training throughput of our models against a baseline implementation on CPU, side by side.

RWKV-4 (`--arch rwkv4`, preset 169m, ctx 1024) against transformers' RwkvForCausalLM; RWKV-7
(`--arch rwkv7`, preset rwkv7-0.1b, ctx 512) against the `rwkv7_hf` package's RWKV7ForCausalLM, the
pure-PyTorch HF model (our weights mapped through launch/hf_format_rwkv7). The arch follows --preset;
--arch picks the default preset (and ctx) of that arch. rwkv7_hf 0.9 has a single code path: its
config's attn_mode / fuse_norm are accepted and ignored (no chunked mode), the WKV recurrence runs
token by token in ops_rwkv7.rwkv7_recurrent and the projections in 128-row tiles; we run that path
without gradient checkpointing and without a cache, its fastest way to train.

One training step = forward, cross-entropy on next-token targets, backward (the optimizer step is
left out: it is the same for both models). Each model runs in fp32 and in bf16; bf16 means bf16
weights and activations (the module as DeepSpeed's bf16 mode holds it), no autocast. MFU is the
achieved model FLOP/s (ModelConfig.flops_per_token x tokens/s) over this machine's matmul peak for
that dtype, measured in the same run with a large torch.matmul.

Weights the init leaves at zero (LoRA down-projections, output projections) get small random
values first, so that the first-step loss, printed for both models, checks the same computation.
A baseline step can take minutes (rwkv7_hf steps through ctx tokens in Python): --budget-s stops
timing a model once its timed steps in one dtype took that long (at least one is kept), and
--warmup-ctx runs the warm-up steps on a prefix of the batch. Keep --warmup >= 1: our first step
loads (or builds) the compiled WKV kernel, which takes seconds to minutes.

    python bench/model.py                      # 169m, ctx 1024, batch 1
    python bench/model.py --preset tiny --ctx 256 --steps 2
    python bench/model.py --arch rwkv7 --ctx 512 --steps 2 --warmup-ctx 32 --budget-s 120
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

from launch import hf_format_rwkv4, hf_format_rwkv7  # noqa: E402
from train.config import ModelConfig  # noqa: E402
from train.model import RWKV  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULTS = {"rwkv4": ("169m", 1024), "rwkv7": ("rwkv7-0.1b", 512)}  # arch -> (preset, ctx)
BASELINE = {"rwkv4": "transformers", "rwkv7": "rwkv7_hf"}
BASELINE_PATH = {
    "rwkv4": "transformers RwkvForCausalLM, its CPU path (no custom kernel), use_cache=False",
    "rwkv7": "rwkv7_hf RWKV7ForCausalLM, its only path (token-by-token recurrence; attn_mode ignored), "
    "no gradient checkpointing, use_cache=False",
}
LOSS_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # same computation: |loss difference| below


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


class Logits(torch.nn.Module):
    """A Hugging Face causal LM with our call signature: idx -> logits (no cache)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inner(idx, use_cache=False).logits


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
    return Logits(RwkvForCausalLM(hf_cfg))


def rwkv7_hf_model(ours: torch.nn.Module) -> torch.nn.Module:
    """rwkv7_hf's RWKV7ForCausalLM holding our weights (strict load), idx -> logits like ours."""
    from rwkv7_hf.configuration_rwkv7 import RWKV7Config
    from rwkv7_hf.modeling_rwkv7 import RWKV7ForCausalLM

    sd = ours.state_dict()
    config = hf_format_rwkv7.hf_config(ours.cfg.to_dict(), {k: tuple(v.shape) for k, v in sd.items()})
    model = RWKV7ForCausalLM(RWKV7Config(**config))
    model.load_state_dict(hf_format_rwkv7.to_hf_state_dict(sd), strict=True)
    assert not model.model.gradient_checkpointing  # off by default: the faster way to train
    return Logits(model)


def baseline_model(ours: torch.nn.Module) -> torch.nn.Module:
    """The baseline of ours' arch with ours' weights."""
    if ours.cfg.arch == "rwkv7":
        return rwkv7_hf_model(ours)
    hf = hf_model(ours.cfg)
    hf.inner.load_state_dict({hf_format_rwkv4.to_hf_key(k): v for k, v in ours.state_dict().items()})
    return hf


@torch.no_grad()
def fill_zeros(model: torch.nn.Module, std: float = 0.02) -> None:
    """Small random values in the matrices the init leaves at zero, so that every one is in the loss."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.dim() >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * std)


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
    fill_zeros(models["ours"])
    if not args.skip_hf:
        models[BASELINE[cfg.arch]] = baseline_model(models["ours"])
    for m in models.values():
        m.to(dtype).train()
    batch_gen = torch.Generator().manual_seed(0)  # the same batch with or without the baseline
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx + 1), generator=batch_gen)
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: list[float] = []
    peak_meter = MatmulPeak(dtype)
    losses: dict[str, float] = {}
    for m in models.values():
        for _ in range(args.warmup):
            train_step(m, idx[:, : (args.warmup_ctx or args.ctx) + 1])
    for _ in tqdm(range(args.steps), desc=f"{dtype_name(dtype)} steps", leave=False):
        peaks.append(peak_meter.measure())
        for name, m in models.items():
            if times[name] and sum(times[name]) > args.budget_s:
                continue  # out of its time budget: keep the steps it has
            seconds, loss = train_step(m, idx)
            losses.setdefault(name, loss)  # the first full step's loss
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
            f"  MFU {100 * mfu:5.1f}%  first-step loss {losses[name]:.5f}  ({len(times[name])} timed)",
            flush=True,
        )
        result[name] = tokens_per_s
    for name in list(models)[1:]:
        diff = abs(losses[name] - losses["ours"])
        same = "same computation" if diff <= LOSS_TOL[dtype] else "MISMATCH: not the same computation"
        print(f"first-step loss |{name} - ours| {dtype_name(dtype)}: {diff:.2e} ({same})", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(DEFAULTS), help="the default preset and ctx of this arch")
    parser.add_argument("--preset", help="default: 169m (rwkv4), rwkv7-0.1b (rwkv7); its arch is used")
    parser.add_argument("--ctx", type=int, help="default: 1024 (rwkv4), 512 (rwkv7)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and dtype (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-ctx", type=int, default=0, help="warm up on this many tokens (0: ctx)")
    parser.add_argument(
        "--budget-s", type=float, default=float("inf"),
        help="stop timing a model in a dtype once its timed steps took this long (at least 1 step)",
    )
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--wkv-backend", default="auto", help="auto | cpu | reference")
    parser.add_argument("--skip-hf", action="store_true", help="only our model (no baseline, no ratio)")
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = DEFAULTS[args.arch or "rwkv4"][0]
    arch = ModelConfig.from_preset(args.preset).arch
    if args.arch and args.arch != arch:
        parser.error(f"--preset {args.preset} is an {arch} preset, not {args.arch}")
    if args.ctx is None:
        args.ctx = DEFAULTS[arch][1]

    cfg = ModelConfig.from_preset(args.preset, ctx_len=args.ctx, wkv_backend=args.wkv_backend)
    baseline = BASELINE[cfg.arch]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    print(
        f"preset {args.preset} ({cfg.arch}): {cfg.n_params() / 1e6:.1f}M params, ctx {args.ctx}, "
        f"batch {args.batch}, "
        f"{cfg.flops_per_token(args.ctx) / 1e9:.3f} GFLOP/token (fwd+bwd); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {dtype: bench_dtype(dtype, args, cfg) for dtype in dtypes}
    print(
        f"load average at the end {os.getloadavg()[0]:.1f} (figures are only meaningful on an idle machine)"
    )
    if not args.skip_hf:
        print(f"baseline: {BASELINE_PATH[cfg.arch]}")
        for dtype, r in results.items():
            print(f"ratio ours/{baseline} {dtype_name(dtype)}: {r['ours'] / r[baseline]:.2f}x")
        best_ours = max(r["ours"] for r in results.values())
        best_theirs = max(r[baseline] for r in results.values())
        print(f"ratio best ours / best {baseline}: {best_ours / best_theirs:.2f}x (target >= 3x)")
    if torch.bfloat16 in results:
        r = results[torch.bfloat16]
        mfu = r["ours"] * cfg.flops_per_token(args.ctx) / r["peak"]
        print(f"ours bf16 MFU: {100 * mfu:.1f}% (target >= 40%)")


if __name__ == "__main__":
    main()
