"""Training throughput on one GPU: our models (CUDA WKV kernels) next to transformers' RwkvForCausalLM.

    python bench/gpu_throughput.py [--presets 169m,430m,1b5,rwkv7-0.1b] [--ctx 1024,4096] [--tokens 16384]
                                   [--json OUT]

For each preset and context length, one training step as the trainer runs it on a GPU: bf16 weights,
forward, cross-entropy, backward, fused AdamW; micro-batch = tokens / ctx. Prints tokens/s, MFU
(ModelConfig.flops_per_token over the device's dense bf16 peak) and peak memory, and the same step of
`transformers.RwkvForCausalLM` (same sizes, same data; RWKV-4 presets) where it fits in time and memory,
with the ratio.
Both run in this one process, one after the other, so they see the same GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import hf_model  # noqa: E402  (bench/model.py: transformers RWKV, idx -> logits)

from train.config import ModelConfig  # noqa: E402
from train.metrics import peak_tflops  # noqa: E402
from train.model import RWKV  # noqa: E402


def time_steps(model: torch.nn.Module, logits_of, batch: torch.Tensor, iters: int, budget_s: float) -> dict:
    """Median seconds per optimizer step after one warm-up; stops early past budget_s."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iters + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = logits_of(model, batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
        if time.perf_counter() - t0 > budget_s or (i == 0 and dt > budget_s / 2):
            break  # one warm-up step that slow means no timed steps fit: report none
    peak = torch.cuda.max_memory_allocated() / 2**30
    if not times:  # too slow to time more: the warm-up step stands in (an upper bound on its speed)
        return {"seconds": dt, "peak_gib": peak, "note": "1 warm-up step"}
    return {"seconds": sorted(times)[len(times) // 2], "peak_gib": peak, "loss": loss.item()}


def run_one(preset: str, ctx: int, tokens: int, iters: int, hf: bool, budget_s: float) -> dict:
    cfg = ModelConfig.from_preset(preset, ctx_len=ctx, wkv_backend="cuda")  # the preset's vocabulary
    micro = max(1, tokens // ctx)
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (micro, ctx + 1), device="cuda", generator=g)
    tok = micro * ctx
    peak = peak_tflops(0, torch.device("cuda"), "bf16")
    row: dict = {"preset": preset, "arch": cfg.arch, "ctx": ctx, "micro_batch": micro}
    row["params"] = cfg.n_params()
    torch.manual_seed(0)
    try:
        with torch.device("cuda"):
            model = RWKV(cfg).to(torch.bfloat16)
        res = time_steps(model, lambda m, x: m(x), batch, iters, budget_s)
    except torch.cuda.OutOfMemoryError:
        row["ours_note"] = "out of memory"
        return row
    finally:
        model = None
        torch.cuda.empty_cache()
    if res["seconds"]:
        row["ours_tokens_per_s"] = tok / res["seconds"]
        row["ours_mfu"] = row["ours_tokens_per_s"] * cfg.flops_per_token() / (peak * 1e12) if peak else None
    row["ours_peak_gib"] = res["peak_gib"]
    if hf and cfg.arch == "rwkv4":  # transformers' RwkvForCausalLM is RWKV-4
        try:
            model = hf_model(cfg).to("cuda", torch.bfloat16)
            res = time_steps(model, lambda m, x: m(x), batch, iters, budget_s)
            row["hf_tokens_per_s"] = tok / res["seconds"]
            row["ratio"] = row.get("ours_tokens_per_s", 0.0) / row["hf_tokens_per_s"]
            if "note" in res:
                row["hf_note"] = res["note"]
            row["hf_peak_gib"] = res["peak_gib"]
        except torch.cuda.OutOfMemoryError:
            row["hf_note"] = "out of memory"
        finally:
            model = None
            torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="169m,430m,1b5")
    p.add_argument("--ctx", default="1024,4096")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (micro-batch x ctx)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--hf-budget-s", type=float, default=30.0, help="time allowed for one transformers run")
    p.add_argument("--hf-presets", default="169m", help="presets to also run in transformers ('' for none)")
    p.add_argument(
        "--hf-ctx",
        default="1024",
        help="context lengths to run transformers at (its loop costs ~1 min/step at 4096)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: needs a CUDA device (torch.cuda.is_available() is False)")
        return 2
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"bf16 dense peak {peak_tflops(0, torch.device('cuda'), 'bf16')} TFLOP/s"
    )
    rows = []
    for preset in args.presets.split(","):
        for ctx in (int(c) for c in args.ctx.split(",")):
            hf = preset in args.hf_presets.split(",") and str(ctx) in args.hf_ctx.split(",")
            row = run_one(preset, ctx, args.tokens, args.iters, hf, args.hf_budget_s)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| preset | ctx | micro | ours tok/s | MFU | peak GiB | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = f"{r['ours_tokens_per_s']:,.0f}" if "ours_tokens_per_s" in r else r.get("ours_note", "-")
        mfu = f"{r['ours_mfu']:.1%}" if r.get("ours_mfu") else "-"
        hf = f"{r['hf_tokens_per_s']:,.0f}" if "hf_tokens_per_s" in r else r.get("hf_note", "-")
        hf += f" ({r['hf_note']})" if "hf_tokens_per_s" in r and "hf_note" in r else ""
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else "-"
        peak = f"{r['ours_peak_gib']:.1f}" if "ours_peak_gib" in r else "-"
        print(
            f"| {r['preset']} | {r['ctx']} | {r['micro_batch']} | {ours} | {mfu} | {peak} "
            f"| {hf} | {ratio} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
