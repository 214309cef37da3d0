"""Peak host memory per rank of model construction + engine init, ZeRO-3, with and without zero.Init.

    python bench/zero_init.py [--preset 430m] [--vocab-size 1024] [--precision bf16]

Runs the same 2-process job (torchrun, gloo, DS_ACCELERATOR=cpu) three times: ZeRO-3 building the
whole model on every rank and letting the engine partition it (what the trainer did before),
ZeRO-3 under `deepspeed.zero.Init` (what the trainer does now), and ZeRO-2 for reference. Each rank
samples its own RSS every 5 ms; printed per rank, above its RSS before the model exists: the peak
while it is built (next to `train.estimate`'s construction figure), the peak through
`deepspeed.initialize`, and through one optimizer step (batch 1 x 16 tokens; Adam's moments are
created here), next to `train.estimate`'s model states; then the ratio zero.Init / plain. The
optimizer is torch AdamW (no C++ build); on CPU the "device" is host memory too, so engine-init
and step peaks include what a GPU would hold. MALLOC_MMAP_THRESHOLD_=65536 (unless set) so that
freed tensors leave RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("zero3_plain", "zero3_zero_init", "zero2")
TOLERANCE = 0.25  # measured construction peak within 25% of the estimate


class PeakRSS:
    """RSS sampled in a thread; `phase()` returns the peak since the last call."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def phase(self) -> int:
        time.sleep(0.02)
        peak, self.peak = self.peak, self.proc.memory_info().rss
        return peak


def worker(mode: str, preset: str, vocab: int, precision: str, bucket: int, out: str) -> None:
    import gc

    import deepspeed
    import torch

    from train.config import ModelConfig
    from train.model import RWKV
    from train.optim import param_groups, torch_adamw

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    stage = 2 if mode == "zero2" else 3
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
          "zero_optimization": {"stage": stage, "contiguous_gradients": True, "reduce_bucket_size": bucket,
                                "allgather_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket // 4,
                                "stage3_param_persistence_threshold": 100000},
          "bf16": {"enabled": precision == "bf16"}}
    mc = ModelConfig.from_preset(preset, vocab_size=vocab, wkv_backend="reference")
    gc.collect()
    rss = PeakRSS()
    base = rss.phase()
    torch.manual_seed(0)
    zero_init = mode == "zero3_zero_init"
    ctx = deepspeed.zero.Init(config_dict_or_path=ds) if zero_init else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        model = RWKV(mc)
    construct = rss.phase()
    t_construct = time.perf_counter() - t0
    deepspeed.comm.barrier()
    rss.phase()
    opt = torch_adamw(param_groups(model, 0.0, True), 1e-4, [0.9, 0.99], 1e-8)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    engine = max(construct, rss.phase())
    # One optimizer step (batch 1 x 16 tokens): Adam's moments exist from here on.
    idx = torch.randint(0, vocab, (1, 17), generator=torch.Generator().manual_seed(rank))
    loss = torch.nn.functional.cross_entropy(eng(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
    eng.backward(loss)
    eng.step()
    step = max(engine, rss.phase())
    rss.stop = True
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "base": base, "construct": construct - base,
         "engine": engine - base, "step": step - base, "construct_s": t_construct}))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # glibc serves blocks under its (adaptive, up to 32 MiB) mmap threshold from heaps that keep
    # freed memory resident; with every block over 64 KiB mmapped, RSS follows live tensors, as a
    # GPU's caching allocator statistics would.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out = tmp / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_port()), __file__, "--worker", mode, "--preset", args.preset, "--vocab-size",
           str(args.vocab_size), "--precision", args.precision, "--bucket", str(args.bucket),
           "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{k}.json").read_text()) for k in range(2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="430m")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--bucket", type=int, default=200_000_000,
                    help="reduce/allgather bucket size in elements (ds_config.json: 2e8; prefetch: 1/4)")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.preset, args.vocab_size, args.precision, args.bucket, args.out)
        return 0

    from train.config import ModelConfig
    from train.estimate import construction_bytes, estimate

    mc = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size)
    pbytes = 2 if args.precision == "bf16" else 4
    est = {"zero3_plain": construction_bytes(mc, 2, False), "zero2": construction_bytes(mc, 2, False),
           "zero3_zero_init": construction_bytes(mc, 2, True, pbytes)}
    # train.estimate's model states per rank (16-bit weights and gradients, fp32 master, gradients
    # and Adam moments); on CPU all of it is host memory.
    states = {m: estimate(mc, 2, 2 if m == "zero2" else 3, 16, 1).model_states for m in MODES}
    gib = 2**30
    print(f"{args.preset} (vocab {args.vocab_size}): {mc.n_params() / 1e6:.1f} M parameters; 2 processes, "
          f"{args.precision}, buckets {args.bucket:.0e} elements, DS_ACCELERATOR=cpu; "
          "memory above each rank's RSS before construction")
    print(f"{'mode':<17}{'rank':>5}{'construct GiB':>15}{'estimate GiB':>14}{'+engine init GiB':>18}"
          f"{'+1 step GiB':>13}{'model states est.':>19}{'build s':>9}")
    results, ok = {}, True
    with tempfile.TemporaryDirectory(prefix="zero_init_bench_") as d:
        for mode in MODES:
            results[mode] = run_mode(mode, args, Path(d))
            for r in results[mode]:
                print(f"{mode:<17}{r['rank']:>5}{r['construct'] / gib:>15.2f}{est[mode] / gib:>14.2f}"
                      f"{r['engine'] / gib:>18.2f}{r['step'] / gib:>13.2f}{states[mode] / gib:>19.2f}"
                      f"{r['construct_s']:>9.1f}")
                if abs(r["construct"] - est[mode]) > TOLERANCE * est[mode]:
                    ok = False
    plain, part = results["zero3_plain"], results["zero3_zero_init"]
    c = max(r["construct"] for r in part) / max(r["construct"] for r in plain)
    e = max(r["engine"] for r in part) / max(r["engine"] for r in plain)
    print(f"zero.Init / plain, worst rank: construction {c:.2f}x, construction + engine init {e:.2f}x")
    print(f"construction within {TOLERANCE:.0%} of train.estimate: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
