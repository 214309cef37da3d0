"""Training throughput: DeepSpeed ZeRO-2 over 2 CPU processes against a plain PyTorch loop.

Both train the same RWKV-4 model on the same demo-corpus windows with the same micro-batch per
process and AdamW; the plain loop is one process with no DeepSpeed and no process group. Printed:
tokens/s and MFU of each, and the ratio of DeepSpeed's per-process tokens/s to the plain loop's
(how much the distributed machinery costs per process; 1.0 = free).

    python bench/train.py [--steps 30] [--precision fp32|bf16] [--n-layer 4] [--n-embd 256] [--ctx-len 256]

Steps after the first few (warm-up) are timed; checkpoint saving is left out of DeepSpeed's timing
(metrics.jsonl times each optimizer step alone).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WARMUP = 5


def prepare_data(work: Path) -> Path:
    from data_prep.pipeline import PrepSettings, run_prep
    from data_prep.train_tokenizer import train_sentencepiece

    corpus = [str(p) for p in sorted((REPO / "data" / "demo" / "train").glob("*.jsonl.zst"))]
    tok = train_sentencepiece(corpus, str(work / "sp"), vocab_size=2048, max_sentences=50_000)
    run_prep(PrepSettings(inputs=corpus, tokenizer=str(tok), output_prefix=str(work / "demo"),
                          workers=1, shards=2, progress=False))
    return work / "demo.manifest.json"


def overrides(args: argparse.Namespace, manifest: Path, run_dir: Path) -> list[str]:
    return [
        f"data.manifests=[{manifest}]", f"run_dir={run_dir}", f"model.n_layer={args.n_layer}",
        f"model.n_embd={args.n_embd}", f"train.ctx_len={args.ctx_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.steps={args.steps}", f"train.precision={args.precision}", "train.zero_stage=2",
        "optim.name=torch_adamw", "eval.batches=0", "checkpoint.every=0", "log.progress=false",
        "log.tensorboard=false", f"log.peak_tflops={args.peak_tflops}",
    ]


def run_deepspeed(args: argparse.Namespace, manifest: Path, work: Path) -> dict[str, float]:
    run_dir = work / "ds"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "train", "--config", str(REPO / "configs" / "tiny.yaml")]
    for o in overrides(args, manifest, run_dir):
        cmd += ["--set", o]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    log = work / "ds.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"DeepSpeed run failed (exit {rc}); log: {log}\n{log.read_text()[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["step"] > WARMUP]
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    return {"tokens_per_s": tps, "per_process": tps / 2, "mfu": statistics.median(r["mfu"] for r in recs),
            "final_loss": recs[-1]["loss"]}


def run_plain(args: argparse.Namespace, manifest: Path) -> dict[str, float]:
    """The same model, data windows and optimizer in a bare single-process PyTorch loop."""
    import torch

    from train.config import ModelConfig
    from train.data import TokenWindows
    from train.loss import lm_loss
    from train.metrics import mfu
    from train.model import RWKV
    from train.optim import apply_lr, param_groups, torch_adamw

    torch.set_num_threads(1)
    data = TokenWindows([manifest], args.ctx_len, val_documents=32)
    mc = ModelConfig.from_preset("tiny", n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=data.vocab_size,
                                 ctx_len=args.ctx_len)
    torch.manual_seed(1234)
    model = RWKV(mc)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    opt = torch_adamw(param_groups(model, 0.0, True), 3e-3, [0.9, 0.99], 1e-8)
    apply_lr(opt, 3e-3)
    times, loss = [], float("nan")
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = data.batch(step, 0, 0, 1, args.micro_batch, 1)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(batch[:, :-1])
        out, _ = lm_loss(logits, batch[:, 1:], True)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(out.detach())
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[WARMUP:])
    tps = args.micro_batch * args.ctx_len / dt
    util = mfu(tps, mc.flops_per_token(), 1, args.peak_tflops)
    return {"tokens_per_s": tps, "per_process": tps, "mfu": util, "final_loss": loss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--ctx-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=1.0, help="per process, for MFU")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        manifest = prepare_data(work)
        plain = run_plain(args, manifest)
        ds = run_deepspeed(args, manifest, work)
    print(f"\nRWKV-4 {args.n_layer} x {args.n_embd}, ctx {args.ctx_len}, micro-batch {args.micro_batch} per "
          f"process, {args.precision}, {args.steps} steps (first {WARMUP} not timed); MFU against "
          f"{args.peak_tflops:g} TFLOP/s per process")
    print(f"{'':32}{'tokens/s':>12}{'per process':>14}{'MFU':>9}{'last loss':>11}")
    for name, r in (("plain PyTorch, 1 process", plain), ("DeepSpeed ZeRO-2, 2 processes", ds)):
        print(f"{name:32}{r['tokens_per_s']:12,.0f}{r['per_process']:14,.0f}{r['mfu']:9.2%}{r['final_loss']:11.3f}")
    print(f"ratio DeepSpeed / plain, per process: {ds['per_process'] / plain['per_process']:.2f}   "
          f"total: {ds['tokens_per_s'] / plain['tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
