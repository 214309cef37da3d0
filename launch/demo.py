"""The end-to-end demo (`make demo`): corpus -> tokenizer -> shards -> ZeRO-2 training on 2 CPU
processes, interrupted and resumed -> inference weights (rwkv .pth, Hugging Face) -> a sample
and held-out perplexity before and after training.

    python -m launch.demo [--out runs/demo] [--clean] [--quick] [--steps N]
        [--arch rwkv7|rwkv6|rwkv5|rwkv4|rrwkv]

The model is RWKV-7 (configs/demo.yaml: the rwkv7-tiny preset at 6 layers x 256); `--arch rwkv4`,
`rwkv5`, `rwkv6` or `rrwkv` trains the same size as that architecture (RWKV-5/6 and RRWKV have no
Hugging Face format, so that step is left out; RRWKV's .pth is this pipeline's own layout).

Every step runs the project's own command line (printed before it runs), so the demo doubles
as a walkthrough. The output directory is re-runnable: a step whose outputs exist and are
complete is skipped; `--clean` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from launch.hf_format import OWN_LAYOUT_ONLY
from train.models import ARCH_TITLES

if TYPE_CHECKING:
    from train.run_config import RunConfig

REPO = Path(__file__).resolve().parent.parent
CORPUS = sorted((REPO / "data" / "demo" / "train").glob("*.jsonl.zst"))
# A scene opening in the corpus's layout, so the sample continues with dialogue.
PROMPT = "SCENE II. Verona. A street.\n\n[Enter ROMEO and MERCUTIO]\n\nROMEO:\n"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
# --arch: the preset whose architecture the demo model takes (its sizes stay those of demo.yaml)
ARCH_PRESETS = {"rwkv7": "rwkv7-tiny", "rwkv4": "tiny", "rwkv5": "rwkv5-tiny", "rwkv6": "rwkv6-tiny",
                "rrwkv": "rrwkv-tiny"}
HF_FORMATS = {"rwkv7": "Hugging Face directory (flash-linear-attention layout)",
              "rwkv4": "Hugging Face transformers directory"}


@dataclass
class Settings:
    out: Path
    vocab_size: int
    tokenizer_sentences: int  # lines sampled to train the tokenizer
    nproc: int
    sample_tokens: int
    heldout_tokens: int  # held-out text scored for perplexity (a prefix of the validation documents)
    arch: str = "rwkv7"
    # trainer --set overrides on top of configs/demo.yaml (the output paths are always added)
    train_sets: list[str] = field(default_factory=list)
    steps: int = 0  # optimizer steps of the whole run, as resolved from the config

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer" / "demo.model"

    @property
    def manifest(self) -> Path:
        return self.out / "data" / "demo.manifest.json"

    @property
    def heldout(self) -> Path:
        return self.out / "data" / "heldout.txt"

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def rwkv_weights(self) -> Path:
        return self.out / "weights" / "demo.pth"

    @property
    def hf_dir(self) -> Path:
        return self.out / "weights" / "hf"

    @property
    def sample(self) -> Path:
        return self.out / "sample.txt"

    @property
    def perplexity(self) -> Path:
        return self.out / "perplexity.json"

    @property
    def state(self) -> Path:
        return self.out / "demo_state.json"


QUICK_TRAIN_SETS = [  # the test's reduced form: every step of the demo, a few minutes less
    "model.n_layer=2",
    "model.n_embd=64",
    "train.ctx_len=64",
    "train.micro_batch_size=4",
    # Enough steps after the first checkpoint that the kill lands mid-run even on an idle machine.
    "train.steps=100",
    "checkpoint.every=20",
    "eval.every=20",
    "eval.batches=1",
    "log.progress=false",
]


def demo_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(
            args.out,
            vocab_size=512,
            tokenizer_sentences=20000,
            nproc=2,
            sample_tokens=40,
            heldout_tokens=1500,
            train_sets=list(QUICK_TRAIN_SETS),
        )
    else:
        s = Settings(
            args.out,
            vocab_size=2048,
            tokenizer_sentences=100_000,
            nproc=2,
            sample_tokens=300,
            heldout_tokens=8000,
        )
    s.arch = args.arch
    s.train_sets.insert(0, f"model.preset={ARCH_PRESETS[args.arch]}")
    if args.steps:
        s.train_sets.append(f"train.steps={args.steps}")
    s.train_sets += list(args.set or [])
    cfg = run_config(s)
    if not 0 < cfg.checkpoint.every < cfg.train.steps:  # keep a checkpoint to interrupt after
        s.train_sets.append(f"checkpoint.every={max(1, cfg.train.steps // 3)}")
    s.steps = cfg.train.steps
    return s


def run_config(s: Settings) -> RunConfig:
    from train.run_config import load_run_config

    return load_run_config(DEMO_CONFIG, train_overrides(s))


# ----------------------------------------------------------------------------- running commands


def child_env(processes: int) -> dict[str, str]:
    """Environment of the demo's commands: CPU training, and the cores shared among `processes`
    (unless OMP_NUM_THREADS is set already)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")  # the demo trains on CPU processes, GPU or not
    if env["DS_ACCELERATOR"] == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # so no stage picks a GPU that DeepSpeed will not use
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def show(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)


class Streamed:
    """A child process whose output is echoed live and appended to a log (read on a thread, so the
    caller can watch for other things meanwhile)."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], stdout_only: bool = False) -> None:
        show(cmd)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.cmd, self.log = cmd, log
        # stdout_only: stderr (progress bars) goes straight to the terminal, stdout alone is kept
        stderr = None if stdout_only else subprocess.STDOUT
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO
        )
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "ab") as f:
            while data := os.read(self.proc.stdout.fileno(), 65536):
                self.chunks.append(data)
                f.write(data)
                sys.stdout.buffer.write(data)
                sys.stdout.flush()

    def wait(self) -> int:
        rc = self.proc.wait()
        self.thread.join()
        return rc

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def failure(self, rc: int) -> DemoError:
        cmd = " ".join(shlex.quote(str(c)) for c in self.cmd)
        return DemoError(f"command failed with exit status {rc} (log: {self.log}):\n  {cmd}")


def run(cmd: list[str], log: Path, env: dict[str, str], stdout_only: bool = False) -> str:
    """Run cmd, echoing its output live and into `log`; return the output. Raise on failure."""
    child = Streamed(cmd, log, env, stdout_only)
    rc = child.wait()
    if rc != 0:
        raise child.failure(rc)
    return child.output


class DemoError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- state of the output dir


def load_state(s: Settings) -> dict:
    return json.loads(s.state.read_text()) if s.state.is_file() else {}


def save_state(s: Settings, **updates: object) -> None:
    state = {**load_state(s), **updates}
    tmp = s.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, s.state)


def latest_tag(s: Settings) -> str | None:
    """Newest checkpoint tag that the trainer marked complete (every rank finished saving it)."""
    steps = [tag_step(p.parent.name) for p in s.checkpoints.glob("step*/complete.json")]
    steps = [n for n in steps if n >= 0]
    return f"step{max(steps)}" if steps else None


def tag_step(tag: str | None) -> int:
    m = re.fullmatch(r"step(\d+)", tag or "")
    return int(m.group(1)) if m else -1


def metrics(s: Settings) -> list[dict]:
    path = s.run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
    return rows


def newer_than(path: Path, reference: Path) -> bool:
    return path.exists() and reference.exists() and path.stat().st_mtime >= reference.stat().st_mtime


# ----------------------------------------------------------------------------- the steps


def tokenizer_done(s: Settings) -> bool:
    if not s.tokenizer.is_file():
        return False
    try:
        from data_prep.tokenizer import load_tokenizer

        return load_tokenizer(str(s.tokenizer)).vocab_size == s.vocab_size
    except Exception:
        return False


def train_tokenizer(s: Settings, env: dict[str, str]) -> None:
    run(
        [
            sys.executable,
            "-m",
            "data_prep.train_tokenizer",
            "--input",
            *CORPUS,
            "--vocab-size",
            str(s.vocab_size),
            "--model-prefix",
            s.tokenizer.with_suffix(""),
        ],
        s.out / "logs" / "tokenizer.log",
        env,
    )


def shards_done(s: Settings) -> bool:
    if not s.manifest.is_file() or not s.heldout.is_file():
        return False
    try:
        from data_prep.binidx import MMapIndexedDataset
        from data_prep.manifest import load_manifest

        manifest = load_manifest(str(s.manifest))
        for shard in manifest["shards"]:
            MMapIndexedDataset(shard["prefix"])
        return True
    except Exception:
        return False


def prep_shards(s: Settings, env: dict[str, str]) -> None:
    run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--input",
            *CORPUS,
            "--tokenizer",
            s.tokenizer,
            "--output-prefix",
            s.manifest.parent / "demo",
            "--shards",
            "2",
        ],
        s.out / "logs" / "prep.log",
        env,
    )
    write_heldout(s)


def write_heldout(s: Settings) -> None:
    """Held-out text = the validation documents the trainer sets aside (the last documents of the
    last shard), decoded back to text, so the perplexity is measured on text training never saw."""
    from data_prep.binidx import MMapIndexedDataset
    from data_prep.manifest import load_manifest
    from data_prep.tokenizer import load_tokenizer

    cfg = run_config(s)
    tok = load_tokenizer(str(s.tokenizer))
    last = MMapIndexedDataset(load_manifest(str(s.manifest))["shards"][-1]["prefix"])
    n_val = cfg.data.val_documents
    if n_val <= 0:
        raise DemoError("configs/demo.yaml holds out no validation documents (data.val_documents)")
    ids: list[int] = []
    for i in range(len(last) - n_val, len(last)):
        ids.extend(int(t) for t in last[i] if int(t) != tok.eod_id)
        if len(ids) >= s.heldout_tokens:
            break
    s.heldout.write_text(tok.decode(ids[: s.heldout_tokens]), encoding="utf-8")


def train_overrides(s: Settings) -> list[str]:
    return [f"run_dir={s.run_dir}", f"data.manifests=[{s.manifest}]", *s.train_sets]


def train_cmd(s: Settings) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [torchrun] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher,
        "--standalone",
        "--nproc_per_node",
        str(s.nproc),
        "-m",
        "train",
        "--config",
        DEMO_CONFIG,
    ]
    for o in train_overrides(s):
        cmd += ["--set", o]
    return cmd


def training_done(s: Settings) -> bool:
    return tag_step(latest_tag(s)) >= s.steps


def kill_tree(pid: int) -> int:
    """SIGKILL a process and all its descendants at once, and wait until they are gone. (torchrun
    starts its workers in sessions of their own: a process-group kill would miss them.)"""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    return len(procs)


def train_until_first_checkpoint(s: Settings, env: dict[str, str]) -> None:
    """Start training, and kill every process of it (SIGKILL, as a crash or a pre-empted node
    would) as soon as the first checkpoint is complete."""
    child = Streamed(train_cmd(s), s.out / "logs" / "train_part1.log", child_env(s.nproc))
    t0 = time.time()
    while child.proc.poll() is None and latest_tag(s) is None:
        time.sleep(0.1)
        if time.time() - t0 > 1800:
            kill_tree(child.proc.pid)
            raise DemoError(f"no checkpoint after 30 minutes (log: {child.log})")
    tag = latest_tag(s)
    if child.proc.poll() is None:
        killed = kill_tree(child.proc.pid)
        child.wait()
        print(
            f"\n>>> checkpoint {tag} is complete: killed torchrun and the training processes "
            f"({killed} processes, SIGKILL), as a crash or a pre-empted node would",
            flush=True,
        )
    elif (rc := child.wait()) != 0:
        raise child.failure(rc)
    save_state(s, interrupted_at=tag_step(tag))


def resume_training(s: Settings, env: dict[str, str]) -> None:
    print(f"resuming from checkpoint {latest_tag(s)}: the same command again", flush=True)
    out = run(train_cmd(s), s.out / "logs" / "train_part2.log", child_env(s.nproc))
    m = re.search(r"resumed from (\S+) at step (\d+)", out)
    if m is None:
        raise DemoError("the second training run did not report resuming from a checkpoint")
    save_state(s, resumed_from=int(m.group(2)))


def convert_done(s: Settings, kind: str) -> bool:
    tag = latest_tag(s)
    out = s.rwkv_weights if kind == "rwkv" else s.hf_dir / "model.safetensors"
    return tag is not None and newer_than(out, s.checkpoints / tag / "complete.json")


def convert(s: Settings, env: dict[str, str], kind: str) -> None:
    out = s.rwkv_weights if kind == "rwkv" else s.hf_dir
    run(
        [
            sys.executable,
            "-m",
            "launch.convert",
            "--input",
            s.checkpoints,
            "--tag",
            str(latest_tag(s)),
            "--to",
            kind,
            "--output",
            out,
            "--verify",
            "--tokenizer",
            s.tokenizer,
        ],
        s.out / "logs" / f"convert_{kind}.log",
        env,
    )


def generate(s: Settings, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "launch.generate", "--weights", s.rwkv_weights, "--tokenizer", s.tokenizer,
           "--prompt", PROMPT, "--max-tokens", s.sample_tokens, "--temperature", "0.8", "--top-p", "0.85",
           "--seed", "7"]  # fmt: skip
    out = run(cmd, s.out / "logs" / "generate.log", env, stdout_only=True)
    s.sample.write_text(out, encoding="utf-8")


def score(s: Settings, env: dict[str, str], weights: Path, name: str, extra: list[str]) -> dict:
    out = run(
        [
            sys.executable,
            "-m",
            "launch.generate",
            "--weights",
            weights,
            "--tokenizer",
            s.tokenizer,
            "--score",
            s.heldout,
            *extra,
        ],
        s.out / "logs" / f"score_{name}.log",
        env,
    )
    lines = [ln for ln in out.splitlines() if ln.startswith("{") and '"perplexity"' in ln]
    if not lines:
        raise DemoError(f"launch.generate --score printed no result (log: {s.out / 'logs'})")
    return json.loads(lines[-1])


def perplexity_before(s: Settings, env: dict[str, str]) -> None:
    """Held-out perplexity of a fresh initialisation and of the first checkpoint (before resuming)."""
    import torch

    from launch.model_loading import load_model
    from train.model import RWKV

    tag = latest_tag(s)
    if tag is None:
        raise DemoError(f"no complete checkpoint under {s.checkpoints}")
    cfg = load_model(s.checkpoints, tag).model.cfg  # the run's model config, as recorded with it
    init_dir = s.out / "weights" / "init"
    init_dir.mkdir(parents=True, exist_ok=True)
    (init_dir / "model_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    torch.manual_seed(0)
    torch.save(RWKV(cfg).state_dict(), init_dir / "init.pt")
    results = {
        "fresh initialisation": score(
            s, env, init_dir / "init.pt", "init", ["--model-config", init_dir / "model_config.json"]
        ),
        f"first checkpoint ({tag})": score(s, env, s.checkpoints, "first", ["--tag", tag]),
    }
    s.perplexity.write_text(json.dumps(results, indent=2) + "\n")


def perplexity_after(s: Settings, env: dict[str, str]) -> None:
    results = json.loads(s.perplexity.read_text()) if s.perplexity.is_file() else {}
    results = {k: v for k, v in results.items() if not k.startswith("trained")}
    results[f"trained ({latest_tag(s)})"] = score(s, env, s.rwkv_weights, "final", [])
    s.perplexity.write_text(json.dumps(results, indent=2) + "\n")


def perplexity_after_done(s: Settings) -> bool:
    if not newer_than(s.perplexity, s.rwkv_weights):
        return False
    return any(k.startswith("trained") for k in json.loads(s.perplexity.read_text()))


# ----------------------------------------------------------------------------- orchestration


@dataclass
class Step:
    title: str
    done: Callable[[], bool]
    action: Callable[[], None]


def steps(s: Settings, env: dict[str, str]) -> list[Step]:
    return [
        Step(
            f"Train a sentencepiece tokenizer (vocabulary {s.vocab_size}) on the embedded corpus",
            lambda: tokenizer_done(s),
            lambda: train_tokenizer(s, env),
        ),
        Step("Tokenize the corpus into binidx shards", lambda: shards_done(s), lambda: prep_shards(s, env)),
        Step(
            f"Train {ARCH_TITLES[s.arch]} with DeepSpeed ZeRO-2 on {s.nproc} CPU processes; "
            "kill it after the first checkpoint",
            lambda: latest_tag(s) is not None,
            lambda: train_until_first_checkpoint(s, env),
        ),
        Step(
            "Held-out perplexity before training: fresh initialisation and the first checkpoint",
            lambda: s.perplexity.is_file(),
            lambda: perplexity_before(s, env),
        ),
        Step(
            f"Resume from the ZeRO checkpoint and train to step {s.steps}",
            lambda: training_done(s),
            lambda: resume_training(s, env),
        ),
        Step(
            "Convert to the rwkv package's .pth (--verify)" if s.arch not in OWN_LAYOUT_ONLY
            else "Convert to our .pth layout (--verify; the rwkv package has no code for it)",
            lambda: convert_done(s, "rwkv"),
            lambda: convert(s, env, "rwkv"),
        ),
        *([Step(
            f"Convert to a {HF_FORMATS[s.arch]} (--verify)",
            lambda: convert_done(s, "hf"),
            lambda: convert(s, env, "hf"),
        )] if s.arch in HF_FORMATS else []),
        Step("Generate a sample", lambda: newer_than(s.sample, s.rwkv_weights), lambda: generate(s, env)),
        Step(
            "Held-out perplexity after training",
            lambda: perplexity_after_done(s),
            lambda: perplexity_after(s, env),
        ),
    ]


def summary(s: Settings, timings: list[tuple[str, float, bool]]) -> None:
    heading("Summary")
    for title, secs, skipped in timings:
        print(f"  {secs:7.1f} s  {title}{'  (skipped: already done)' if skipped else ''}")
    print(f"  {sum(t for _, t, _ in timings):7.1f} s  total")
    state = load_state(s)
    if "interrupted_at" in state:
        print(
            f"\nInterrupted after checkpoint step{state['interrupted_at']}; "
            f"resumed from step{state.get('resumed_from', state['interrupted_at'])}."
        )
    if s.perplexity.is_file():
        print("\nHeld-out perplexity (tokens the trainer set aside for validation):")
        for name, r in json.loads(s.perplexity.read_text()).items():
            print(
                f"  {name:32s} {r['perplexity']:10.2f}   "
                f"({r['tokens']} tokens, {r['mean_loss']:.3f} nats/token)"
            )
    if s.sample.is_file():
        print("\nSample (temperature 0.8, top-p 0.85):\n" + "-" * 60)
        print(s.sample.read_text(encoding="utf-8").strip())
        print("-" * 60)

    def rel(p: Path) -> str:  # short paths where the output is under the working directory
        p = p.resolve()
        return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)

    print("\nArtefacts:")
    for label, path in [
        ("tokenizer", s.tokenizer),
        ("token shards + manifest", s.manifest),
        ("held-out text", s.heldout),
        ("run directory", s.run_dir),
        ("resolved config", s.run_dir / "config.resolved.yaml"),
        ("DeepSpeed checkpoints", s.checkpoints),
        ("metrics", s.run_dir / "metrics.jsonl"),
        ("TensorBoard logs", s.run_dir / "tb"),
        ("rwkv .pth", s.rwkv_weights),
        *([("Hugging Face dir", s.hf_dir)] if s.arch in HF_FORMATS else []),
        ("sample", s.sample),
        ("perplexities", s.perplexity),
        ("logs of every step", s.out / "logs"),
    ]:
        print(f"  {label:26s} {rel(path)}{'' if path.exists() else '  (missing)'}")
    print(f"\nTensorBoard:  tensorboard --logdir {rel(s.run_dir / 'tb')}")
    print(
        f"Generate:     {sys.executable} -m launch.generate --weights {rel(s.rwkv_weights)} --prompt 'ROMEO:'"
    )


def heading(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "runs" / "demo", help="output directory (default runs/demo)"
    )
    p.add_argument("--clean", action="store_true", help="delete the output directory first")
    p.add_argument("--quick", action="store_true", help="a reduced run (a couple of minutes) for tests")
    p.add_argument("--steps", type=int, help="optimizer steps of the training run")
    p.add_argument(
        "--arch", choices=sorted(ARCH_PRESETS), default="rwkv7", help="model architecture (default rwkv7)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra trainer --set override")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not CORPUS:
        print(f"error: no corpus files under {REPO / 'data/demo/train'}", file=sys.stderr)
        return 2
    s = demo_settings(args)
    if args.clean and s.out.exists():
        shutil.rmtree(s.out)
    s.out.mkdir(parents=True, exist_ok=True)
    env = child_env(1)  # one process at a time, except training
    timings: list[tuple[str, float, bool]] = []
    all_steps = steps(s, env)
    for i, step in enumerate(all_steps, 1):
        heading(f"[{i}/{len(all_steps)}] {step.title}")
        t0 = time.time()
        if step.done():
            print("already done, skipping (--clean starts over)")
            timings.append((step.title, time.time() - t0, True))
            continue
        try:
            step.action()
        except DemoError as e:
            print(f"\ndemo: error in step {i} ({step.title}): {e}", file=sys.stderr)
            return 1
        secs = time.time() - t0
        timings.append((step.title, secs, False))
        print(f"-- step {i} done in {secs:.1f} s", flush=True)
    summary(s, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
