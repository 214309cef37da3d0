"""Peak memory of `launch.convert` against a naive in-memory conversion, side by side.

    python bench/convert_memory.py [--preset 1b5] [--workdir /tmp/rwkv_convert_bench] [--keep]

Builds a random fp32 state dict of the preset's size tensor by tensor (the 1B5 preset is ~6 GB on
disk), then converts it with `python -m launch.convert` and with a naive converter (torch.load into
memory, cast, save) for each output format, each conversion in its own process. The child's memory
is sampled from /proc every 20 ms:

* peak RSS: everything resident, including pages of memory-mapped input files (clean file pages
  that the kernel can drop under pressure);
* peak anonymous RSS: memory the process itself allocated (what it really needs).

Prints a table and the ratio ours / naive for both peaks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config import ModelConfig  # noqa: E402
from train.model import RWKV  # noqa: E402

NAIVE = r"""
import sys, torch
sys.path.insert(0, sys.argv[5])
from launch.hf_format import to_hf_key
src, to, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
sd = torch.load(src, map_location="cpu", weights_only=True)  # the whole model in memory
sd = {k: v.to(dtype) for k, v in sd.items()}
if to == "hf":
    from safetensors.torch import save_file
    save_file({to_hf_key(k): v for k, v in sd.items()}, out)
else:
    torch.save(sd, out)
"""


def build_state_dict(cfg: ModelConfig, path: Path) -> None:
    """A random fp32 state dict written without ever holding the whole model in memory."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RWKV(cfg).state_dict().items()}
    parts = Path(tempfile.mkdtemp(dir=path.parent, prefix="parts_"))
    g = torch.Generator().manual_seed(0)
    for i, shape in enumerate(tqdm(shapes.values(), desc="random tensors", unit="tensor")):
        t = torch.randn(shape, generator=g) * (0.02 if len(shape) == 2 else 0.5)
        torch.save(t, parts / f"{i}.pt")
        del t
    # torch.save streams storages from memory-mapped parts: no full copy in memory here either
    mapped = {
        name: torch.load(parts / f"{i}.pt", mmap=True, weights_only=True) for i, name in enumerate(shapes)
    }
    torch.save(mapped, path)
    del mapped
    shutil.rmtree(parts)


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str]) -> dict[str, float]:
    """Run cmd; peak RSS and peak anonymous RSS (GiB) sampled from /proc, and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        s = _status_kb(proc.pid)
        peak_rss = max(peak_rss, s.get("VmRSS", 0))
        peak_anon = max(peak_anon, s.get("RssAnon", 0))
        time.sleep(0.02)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    gib = 1024**2
    return {
        "rss": max(peak_rss, 0) / gib,
        "anon": peak_anon / gib,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b5")
    p.add_argument("--workdir", default="/tmp/rwkv_convert_bench")
    p.add_argument("--cases", default="rwkv:fp32,hf:fp32,rwkv:bf16,hf:bf16")
    p.add_argument("--keep", action="store_true", help="keep the random state dict for the next run")
    args = p.parse_args()

    cfg = ModelConfig.from_preset(args.preset)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"random_{args.preset}.pt"
    if not src.is_file():
        build_state_dict(cfg, src)
    size_gib = cfg.n_params() * 4 / 1024**3
    print(f"model: preset {args.preset}, {cfg.n_params() / 1e9:.2f}B params, fp32 {size_gib:.2f} GiB ({src})")

    naive_script = work / "naive_convert.py"
    naive_script.write_text(NAIVE)
    rows = []
    for case in args.cases.split(","):
        to, dtype = case.split(":")
        out = work / (f"out_{to}_{dtype}" + (".safetensors" if to == "hf" else ".pth"))
        out_dir = work / f"out_{to}_{dtype}_dir"
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        naive = measure([sys.executable, str(naive_script), str(src), to, str(out), torch_dtype, str(ROOT)])
        out.unlink()
        ours_out = out_dir if to == "hf" else out
        ours = measure(
            [sys.executable, "-m", "launch.convert", "--input", str(src), "--to", to,
             "--output", str(ours_out), "--dtype", dtype]
        )  # fmt: skip
        shutil.rmtree(out_dir, ignore_errors=True)
        out.unlink(missing_ok=True)
        out.with_suffix(".json").unlink(missing_ok=True)
        rows.append((case, naive, ours))

    print(f"\n{'case':<10} {'naive rss':>10} {'ours rss':>10} {'ratio':>6}   "
          f"{'naive anon':>10} {'ours anon':>10} {'ratio':>6}   {'naive s':>8} {'ours s':>8}")  # fmt: skip
    for case, n, o in rows:
        print(
            f"{case:<10} {n['rss']:>9.2f}G {o['rss']:>9.2f}G {o['rss'] / n['rss']:>6.2f}   "
            f"{n['anon']:>9.2f}G {o['anon']:>9.2f}G {o['anon'] / max(n['anon'], 1e-9):>6.2f}   "
            f"{n['seconds']:>8.1f} {o['seconds']:>8.1f}"
        )
    print(f"(model fp32 size {size_gib:.2f} GiB; rss includes memory-mapped input pages, anon does not)")
    if not args.keep:
        src.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
