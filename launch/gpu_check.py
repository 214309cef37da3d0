"""`make gpu-check`: the acceptance run on a machine with one NVIDIA GPU, torch installed and no network.

    python -m launch.gpu_check [--dry-run] [--out runs/gpu-check] [--quick]

Runs, in order, each as a real command with its log under --out:

1. packages: what this pipeline imports that a bare CUDA + torch image may lack (deepspeed and its
   pure-Python dependencies), with how to install them from wheels;
2. kernel: the CUDA WKV kernels against their fp64 references (tests/test_wkv_cuda.py: fp32, bf16, fp16,
   forward and backward, T = 4096, chunked, no device memory outside PyTorch; tests/test_wkv7_cuda.py:
   WKV-7 values, gradients and state gradients; tests/test_wkv6_cuda.py: the same for WKV-6, u included);
3. train-tiny: `torchrun --nproc_per_node 1` over NCCL, the tiny preset, bf16, FusedAdam, the CUDA
   kernel, SIGKILL after the first checkpoint and a resume;
4. convert: the checkpoint to the `rwkv` .pth and a `transformers` directory, each with --verify;
5. generate: sampling and scoring on the GPU (bf16, the CUDA kernel);
6. train-169m: the 169m preset for a few dozen steps under torchrun (loss falls, tokens/s, MFU);
7. train-rwkv7: the same for rwkv7-0.1b;
8. throughput: bench/gpu_throughput.py, training tokens/s, MFU and peak memory for 169m, 430m and 1b5 at
   ctx 1024 and 4096, next to transformers' RwkvForCausalLM where it fits;
9. throughput-rwkv7: the same for rwkv7-0.1b and rwkv7-1.5b at ctx 4096.

Prints a table and, last, `gpu-check: N passed, M failed`; exit status 0 only if all passed. Runs from
the source tree on the machine's own torch (`PYTHONPATH=.`), never through `make setup`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = [
    REPO / "data" / "demo" / "train" / "00.jsonl.zst",
    REPO / "data" / "demo" / "train" / "01.jsonl.zst",
]

# import name -> pip name, for what the pipeline needs beyond torch. deepspeed is built here as a
# pure-Python wheel (its C++/CUDA ops build just in time on the GPU machine).
REQUIRED = {
    "deepspeed": "deepspeed",
    "hjson": "hjson",
    "pydantic": "pydantic",
    "msgpack": "msgpack",
    "cpuinfo": "py-cpuinfo",
    "einops": "einops",
    "ninja": "ninja",
    "psutil": "psutil",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "zstandard": "zstandard",
    "sentencepiece": "sentencepiece",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "transformers": "transformers",
    "pytest": "pytest",
    "rwkv": "rwkv",  # convert --verify runs the .pth in it
}
WHEEL_HINT = (
    "on a machine with network: `DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8`"
    " and `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64"
    " NAME` for the others; on the GPU machine: `pip install --no-index --no-deps --target DIR *.whl` and"
    " PYTHONPATH=DIR"
)


@dataclass
class Result:
    name: str
    ok: bool
    summary: str
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


@dataclass
class Context:
    out: Path
    quick: bool
    env: dict[str, str]

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer(self) -> Path:
        return self.data / "demo_sp.model"

    @property
    def manifest(self) -> Path:
        return self.data / "demo.manifest.json"

    @property
    def tiny_run(self) -> Path:
        return self.out / "tiny"


class CheckFailed(RuntimeError):
    pass


def run(ctx: Context, name: str, cmd: list, timeout: float = 600, check: bool = True) -> str:
    """Run a command with its output in <out>/logs/<name>.log; CheckFailed with the log's tail on failure."""
    log = ctx.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=ctx.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
    text = log.read_text(errors="replace")
    if check and rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise CheckFailed(f"{' '.join(cmd[:6])} ... exited {rc} (log: {log})\n{tail}")
    return text


def torchrun_cmd(config: Path, sets: list[str]) -> list:
    cmd: list = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "train",
        "--config",
        config,
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def complete_tags(run_dir: Path) -> list[str]:
    ckpt = run_dir / "checkpoints"
    return (
        sorted(p.name for p in ckpt.glob("step*") if (p / "complete.json").is_file()) if ckpt.is_dir() else []
    )


# ------------------------------------------------------------------------------------------- checks
def check_packages(ctx: Context) -> Result:
    missing = [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return Result("packages", False, f"missing: {', '.join(missing)}; {WHEEL_HINT}")
    import deepspeed
    import torch

    return Result(
        "packages",
        True,
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed "
        f"{deepspeed.__version__}; all {len(REQUIRED)} present",
    )


def check_kernel(ctx: Context) -> Result:
    text = run(
        ctx,
        "kernel",
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_wkv_cuda.py",
            "tests/test_wkv7_cuda.py",
            "tests/test_wkv6_cuda.py",
            "tests/test_model_gpu.py",
        ],
        timeout=600,
        check=False,
    )
    passed = sum(int(n) for n in re.findall(r"(\d+) passed", text))
    failed = sum(int(n) for n in re.findall(r"(\d+) (?:failed|error)", text))
    ok = passed > 0 and failed == 0
    detail = f"{passed} passed, {failed} failed" + (
        "" if ok else f" (log: {ctx.out / 'logs' / 'kernel.log'})"
    )
    return Result("kernel", ok, detail)


def prepare_data(ctx: Context) -> None:
    if ctx.manifest.is_file() and ctx.tokenizer.is_file():
        return
    ctx.data.mkdir(parents=True, exist_ok=True)
    run(
        ctx,
        "tokenizer",
        [
            sys.executable,
            "-m",
            "data_prep.train_tokenizer",
            "--input",
            *CORPUS,
            "--vocab-size",
            "2048",
            "--model-prefix",
            ctx.tokenizer.with_suffix(""),
        ],
    )
    run(
        ctx,
        "prep",
        [
            sys.executable,
            "-m",
            "data_prep",
            "--input",
            *CORPUS,
            "--tokenizer",
            ctx.tokenizer,
            "--output-prefix",
            ctx.data / "demo",
            "--shards",
            "2",
            "--workers",
            "4",
        ],
    )


def _tiny_sets(ctx: Context) -> list[str]:
    return [
        f"run_dir={ctx.tiny_run}",
        f"data.manifests=[{ctx.manifest}]",
        "train.steps=60",
        "train.ctx_len=256",
        "train.micro_batch_size=8",
        "train.precision=bf16",
        "optim.name=adam",
        "model.wkv_backend=cuda",
        "checkpoint.every=20",
        "eval.every=20",
        "log.progress=false",
    ]


def check_train_tiny(ctx: Context) -> Result:
    import psutil

    prepare_data(ctx)
    config = REPO / "configs" / "tiny.yaml"
    log = ctx.out / "logs" / "train_tiny_part1.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(c) for c in torchrun_cmd(config, _tiny_sets(ctx))],
            cwd=REPO,
            env=ctx.env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        t0 = time.time()
        while proc.poll() is None and not complete_tags(ctx.tiny_run) and time.time() - t0 < 600:
            time.sleep(0.1)
        killed_at = complete_tags(ctx.tiny_run)
        if proc.poll() is None:
            procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)
            psutil.wait_procs(procs, timeout=30)
        rc = proc.wait()
    if not killed_at:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise CheckFailed(f"no checkpoint before the run ended (exit {rc}; log: {log})\n{tail}")
    text = run(ctx, "train_tiny_part2", torchrun_cmd(config, _tiny_sets(ctx)), timeout=600)
    m = re.search(r"resumed from \S+ at step (\d+)", text)
    if not m:
        raise CheckFailed(f"the second run did not resume (log: {ctx.out / 'logs' / 'train_tiny_part2.log'})")
    recs = [r for r in metrics(ctx.tiny_run) if "loss" in r]
    steps = sorted({r["step"] for r in recs})
    if steps != list(range(1, 61)):
        raise CheckFailed(f"metrics cover steps {steps[:3]}..{steps[-3:]}, expected 1..60 once each")
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    if not last < first - 1.0:
        raise CheckFailed(f"loss did not fall: {first:.3f} -> {last:.3f}")
    mem = max(r.get("gpu_mem_gib", 0.0) for r in recs)
    return Result(
        "train-tiny",
        True,
        f"killed after {killed_at[-1]}, resumed at step {m.group(1)}; "
        f"loss {first:.2f} -> {last:.2f}; peak {mem:.2f} GiB",
        figures={"loss_first": first, "loss_last5": last, "resumed_at": int(m.group(1))},
    )


def check_convert(ctx: Context) -> Result:
    tags = complete_tags(ctx.tiny_run)
    if not tags:
        raise CheckFailed("no checkpoint of train-tiny to convert")
    for kind, out in (("rwkv", ctx.out / "tiny.pth"), ("hf", ctx.out / "tiny_hf")):
        run(
            ctx,
            f"convert_{kind}",
            [
                sys.executable,
                "-m",
                "launch.convert",
                "--input",
                ctx.tiny_run / "checkpoints",
                "--tag",
                tags[-1],
                "--to",
                kind,
                "--output",
                out,
                "--verify",
                "--tokenizer",
                ctx.tokenizer,
            ],
        )
    return Result("convert", True, f"{tags[-1]} -> rwkv .pth and HF directory, both verified")


def check_generate(ctx: Context) -> Result:
    weights = ctx.out / "tiny.pth"
    if not weights.is_file():
        raise CheckFailed("no converted weights (convert failed)")
    common = ["--weights", weights, "--tokenizer", ctx.tokenizer, "--device", "cuda", "--dtype", "bf16"]
    sample = run(
        ctx,
        "generate",
        [
            sys.executable,
            "-m",
            "launch.generate",
            *common,
            "--prompt",
            "ROMEO.",
            "--max-tokens",
            "64",
            "--seed",
            "7",
        ],
    )
    heldout = ctx.out / "heldout.txt"
    heldout.write_text(CORPUS_SAMPLE_TEXT, encoding="utf-8")
    scored = run(ctx, "score", [sys.executable, "-m", "launch.generate", *common, "--score", heldout])
    ppl = json.loads(scored.strip().splitlines()[-1])["perplexity"]
    text = sample.strip().splitlines()[-1][:60]
    return Result(
        "generate", True, f"cuda bf16: sample {text!r}...; perplexity {ppl:.1f}", figures={"perplexity": ppl}
    )


CORPUS_SAMPLE_TEXT = (
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n"
)


def train_preset(ctx: Context, name: str, preset: str, ctx_len: int) -> Result:
    """A few dozen steps of `preset` under torchrun on one GPU: loss falls; tokens/s, MFU, memory."""
    prepare_data(ctx)
    run_dir = ctx.out / preset
    steps = 20 if ctx.quick else 40
    sets = [
        f"run_dir={run_dir}",
        f"data.manifests=[{ctx.manifest}]",
        f"model.preset={preset}",
        f"train.steps={steps}",
        f"train.ctx_len={ctx_len}",
        "train.micro_batch_size=8",
        "train.precision=bf16",
        "optim.name=adam",
        "optim.lr_init=6e-4",
        "optim.lr_final=6e-4",
        "model.wkv_backend=cuda",
        "checkpoint.every=0",
        "eval.every=0",
        "log.progress=false",
    ]
    run(ctx, name.replace("-", "_"), torchrun_cmd(REPO / "configs" / "tiny.yaml", sets), timeout=600)
    recs = [r for r in metrics(run_dir) if "loss" in r]
    if len(recs) != steps:
        raise CheckFailed(f"{len(recs)} metrics records, expected {steps}")
    tail = recs[len(recs) // 2 :]  # past warm-up and the kernel builds
    tps = sorted(r["tokens_per_s"] for r in tail)[len(tail) // 2]
    mfu = sorted((r.get("mfu") or 0.0) for r in tail)[len(tail) // 2]
    first, last = recs[0]["loss"], recs[-1]["loss"]
    if not last < first:
        raise CheckFailed(f"loss did not fall: {first:.3f} -> {last:.3f}")
    mem = max(r.get("gpu_mem_gib", 0.0) for r in recs)
    figs = {"tokens_per_s": tps, "mfu": mfu, "peak_gib": mem, "loss_first": first, "loss_last": last}
    return Result(
        name,
        True,
        f"{tps:,.0f} tok/s, MFU {mfu:.1%}, peak {mem:.1f} GiB, loss "
        f"{first:.2f} -> {last:.2f} (DeepSpeed ZeRO-2, 1 GPU, ctx {ctx_len})",
        figures=figs,
    )


def check_train_169m(ctx: Context) -> Result:
    return train_preset(ctx, "train-169m", "169m", 1024)


def check_train_rwkv7(ctx: Context) -> Result:
    return train_preset(ctx, "train-rwkv7", "rwkv7-0.1b", 1024)


def check_throughput(ctx: Context) -> Result:
    presets = "169m" if ctx.quick else "169m,430m,1b5"
    return throughput(ctx, "throughput", presets, "1024,4096")


def check_throughput_rwkv7(ctx: Context) -> Result:
    # 8,192 tokens per step: rwkv7-1.5b at 16,384 needs more than 80 GB without gradient checkpointing
    presets = "rwkv7-0.1b" if ctx.quick else "rwkv7-0.1b,rwkv7-1.5b"
    return throughput(ctx, "throughput-rwkv7", presets, "4096", tokens=8192)


def throughput(ctx: Context, name: str, presets: str, ctx_lens: str, tokens: int = 16384) -> Result:
    out_json = ctx.out / f"{name}.json"
    text = run(
        ctx,
        name.replace("-", "_"),
        [sys.executable, "bench/gpu_throughput.py", "--presets", presets, "--ctx", ctx_lens,
         "--tokens", str(tokens), "--json", out_json],
        timeout=900,
    )
    rows = json.loads(out_json.read_text())
    table = "\n".join(ln for ln in text.splitlines() if ln.startswith("|"))
    ok = bool(rows) and all(r.get("ours_tokens_per_s", 0) > 0 for r in rows)
    best = max((r.get("ours_mfu") or 0.0) for r in rows) if rows else 0.0
    return Result(
        name, ok, f"{len(rows)} configurations, best MFU {best:.1%}\n{table}", figures={"rows": rows}
    )


CHECKS: list[tuple[str, Callable[[Context], Result], str]] = [
    ("packages", check_packages, "import what the pipeline needs beyond torch"),
    (
        "kernel",
        check_kernel,
        "pytest tests/test_wkv_cuda.py tests/test_wkv7_cuda.py tests/test_wkv6_cuda.py "
        "tests/test_model_gpu.py",
    ),
    (
        "train-tiny",
        check_train_tiny,
        "data_prep on the demo corpus; torchrun --nproc_per_node 1 -m train "
        "(tiny, bf16, FusedAdam, nccl); SIGKILL after the first checkpoint; resume",
    ),
    ("convert", check_convert, "python -m launch.convert --to rwkv / --to hf --verify"),
    ("generate", check_generate, "python -m launch.generate --device cuda --dtype bf16 (sample, --score)"),
    ("train-169m", check_train_169m, "torchrun --nproc_per_node 1 -m train (169m, ctx 1024, bf16)"),
    ("train-rwkv7", check_train_rwkv7, "torchrun --nproc_per_node 1 -m train (rwkv7-0.1b, ctx 1024, bf16)"),
    (
        "throughput",
        check_throughput,
        "python bench/gpu_throughput.py --presets 169m,430m,1b5 --ctx 1024,4096",
    ),
    (
        "throughput-rwkv7",
        check_throughput_rwkv7,
        "python bench/gpu_throughput.py --presets rwkv7-0.1b,rwkv7-1.5b --ctx 4096 --tokens 8192",
    ),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="logs and artefacts")
    p.add_argument("--dry-run", action="store_true", help="list the checks and missing packages; run nothing")
    p.add_argument("--quick", action="store_true", help="fewer steps and presets")
    p.add_argument("--only", help="comma-separated check names to run")
    args = p.parse_args(argv)
    selected = [c for c in CHECKS if not args.only or c[0] in args.only.split(",")]
    missing = [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]

    import torch

    has_gpu = torch.cuda.is_available()
    if args.dry_run:
        print(f"gpu-check would run, logs under {args.out}:")
        for name, _, what in selected:
            print(f"  {name:<11} {what}")
        print("packages missing here: " + (", ".join(missing) if missing else "none"))
        if missing:
            print(f"  install from wheels: {WHEEL_HINT}")
        print("CUDA device: " + (torch.cuda.get_device_name() if has_gpu else "none visible on this machine"))
        return 0
    if not has_gpu:
        print(
            "gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was "
            "checked. Run it on a machine with an NVIDIA GPU; --dry-run lists the checks."
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from train.ext_build import arch_list_for_deepspeed

    # Every stage in one arch spelling DeepSpeed can read: one WKV build serves them all.
    arch_list_for_deepspeed()
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "4")
    ctx = Context(args.out, args.quick, env)
    print(
        f"gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda});"
        " "
        f"logs under {args.out}",
        flush=True,
    )
    results: list[Result] = []
    for name, fn, _ in selected:
        t0 = time.time()
        print(f"--- {name} ...", flush=True)
        try:
            res = fn(ctx)
        except CheckFailed as e:
            res = Result(name, False, str(e))
        except Exception as e:  # a check's own bug must not hide the other checks' results
            res = Result(name, False, f"{type(e).__name__}: {e}")
        res.seconds = time.time() - t0
        results.append(res)
        print(f"    {'PASS' if res.ok else 'FAIL'} in {res.seconds:.0f} s: {res.summary}", flush=True)
    print("\n| check | result | time | detail |\n|---|---|---|---|")
    for r in results:
        first, *rest = r.summary.splitlines() or [""]
        print(f"| {r.name} | {'pass' if r.ok else 'FAIL'} | {r.seconds:.0f} s | {first} |")
        for line in rest:
            print(f"    {line}")
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "results": [r.__dict__ for r in results],
    }
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    passed = sum(r.ok for r in results)
    print(f"gpu-check: {passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
