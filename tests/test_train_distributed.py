"""Real DeepSpeed training: 2 processes over gloo (torchrun), the tiny model on the demo shards.

Per architecture and ZeRO stage: an uninterrupted run (the loss falls), and a run SIGKILLed after a
checkpoint then relaunched, whose metrics.jsonl must equal the uninterrupted run's exactly (fp32 on CPU
is deterministic; RWKV-4 at ZeRO 1-3, RWKV-7 killed at ZeRO 3 only, its other stages run uninterrupted).
Plus: a 2-process checkpoint resumed by 1 plain process through ds_to_universal
(and that one resumed by 2 again); 2 tasks started as srun would, SIGTERM checkpointing, and the
non-finite-loss guard; a step with a NaN inside one rank's forward pass leaves weights and
optimizer state bit-identical (ZeRO 0-3, fp32 and bf16; RWKV-7 in fp32).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from machine import ATTEMPTS, free_port, port_clash

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PAUSED_RUN = Path(__file__).with_name("paused_run.py")
STEPS = 12
EVERY = 4
TOKENS_PER_STEP = 4 * 2 * 64  # micro 4 x world 2 x ctx 64

pytestmark = pytest.mark.slow

# Per architecture: the --set overrides on top of configs/tiny.yaml (RWKV-4 4 x 128 as the file says;
# RWKV-7 2 x 64, one head of 64, with weight decay on and an Adam eps of its own, so that the optimizer
# groups seen in the checkpoint come from this config).
# How far the loss falls in 12 steps at least (RWKV-7 2 x 64 at ZeRO 3 went 7.76 -> 6.63).
FALL = {"rwkv4": 1.0, "rwkv5": 0.7, "rwkv6": 0.7, "rwkv7": 0.7, "rrwkv": 0.7}
ARCH_SETS = {
    "rwkv4": (),
    "rwkv7": ("model.preset=rwkv7-tiny", "model.n_layer=2", "model.n_embd=64", "optim.eps=3e-8",
              "optim.weight_decay=0.01"),
    # RWKV-5/6: 2 x 64, one head of 64, weight decay on (their decay group: the .weight matrices)
    "rwkv5": ("model.preset=rwkv5-tiny", "model.n_layer=2", "model.n_embd=64", "optim.weight_decay=0.01"),
    "rwkv6": ("model.preset=rwkv6-tiny", "model.n_layer=2", "model.n_embd=64", "optim.weight_decay=0.01"),
    # RRWKV 2 x 64 with a medium every 16 tokens (4 per window of 64)
    "rrwkv": ("model.preset=rrwkv-tiny", "model.n_layer=2", "model.n_embd=64", "model.medium_every=16"),
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _cmd(nproc: int | None, run_dir: Path, manifest: str, *sets: str, arch: str = "rwkv4") -> list[str]:
    launcher = (
        # --standalone: torchrun's store binds a free port itself (a port chosen here could be taken
        # by another process before torchrun binds it)
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
        if nproc else [sys.executable]
    )
    cmd = launcher + ["-m", "train", "--config", str(TINY)]
    base = [f"data.manifests=[{manifest}]", f"run_dir={run_dir}", "log.progress=false",
            f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=3", "eval.every=6",
            f"optim.decay_tokens={STEPS * TOKENS_PER_STEP}"]
    for s in base + list(ARCH_SETS[arch]) + list(sets):
        cmd += ["--set", s]
    return cmd


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its descendants at once (torchrun starts each worker in a
    session of its own, so killing the launcher's process group alone would leave them running)."""
    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run(cmd: list[str], log: Path, expect_rc: int = 0, timeout: int = 240) -> str:
    proc = _start(cmd, log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    text = log.read_text()
    assert rc == expect_rc, f"exit {rc} (expected {expect_rc}); log {log}:\n{text[-6000:]}"
    return text


def _records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def _train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run_dir) if "loss" in r}


def _last_step(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 400))
            tail = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step{step}" / "complete.json").is_file()


def _kill_after(cmd: list[str], log: Path, run_dir: Path, min_step: int, min_ckpt: int) -> int:
    """Start a run and SIGKILL its whole process group once step >= min_step is logged and
    checkpoint min_ckpt is complete; returns the last step logged before the kill.

    The run itself stops after logging min_step (paused_run.py) and waits there for the kill: else
    on a fast machine it could log more steps, and complete the next checkpoint, before the kill."""
    i = cmd.index("-m", cmd.index("--nproc_per_node") if "--nproc_per_node" in cmd else 1)
    assert cmd[i : i + 2] == ["-m", "train"], cmd
    cmd = [*cmd[:i], str(PAUSED_RUN), "train", *cmd[i + 2 :]]  # torchrun and python both run a script
    proc = _start(cmd, log, env={**_env(), "RWKV_TEST_PAUSE_AFTER_STEP": str(min_step)})
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            # Cheap poll (the last record only).
            last = _last_step(run_dir)
            if last >= min_step and _complete(run_dir, min_ckpt):
                _kill_tree(proc)
                return max(_train_records(run_dir))
            if proc.poll() is not None:
                pytest.fail(f"run ended (exit {proc.returncode}) before it could be killed:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    pytest.fail(f"run did not reach step {min_step} in time:\n{log.read_text()[-4000:]}")


def _assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    key = lambda r: (r["step"], "val_loss" in r)  # noqa: E731
    assert [key(r) for r in ra] == [key(r) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for field in ("loss", "val_loss", "lr", "tokens", "grad_norm"):
            assert x.get(field) == y.get(field), f"step {x['step']} {field}: {x.get(field)} != {y.get(field)}"


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory):
    """`uninterrupted(arch, stage)`: one uninterrupted 2-process run per architecture and ZeRO stage,
    run on first use and shared by the tests below."""
    out = {}
    root = tmp_path_factory.mktemp("train_ref")

    def get(arch: str, stage: int) -> tuple[Path, str]:
        if (arch, stage) not in out:
            run_dir = root / f"{arch}_zero{stage}"
            text = _run(_cmd(2, run_dir, demo_shards, f"train.zero_stage={stage}", arch=arch),
                        root / f"{arch}_zero{stage}.log")
            out[arch, stage] = (run_dir, text)
        return out[arch, stage]

    return get


@pytest.mark.parametrize(
    ("arch", "stage", "kill"),
    [("rwkv4", 1, True), ("rwkv4", 2, True), ("rwkv4", 3, True),
     ("rwkv7", 1, False), ("rwkv7", 2, False), ("rwkv7", 3, True), ("rwkv5", 2, True), ("rwkv6", 3, True),
     ("rrwkv", 2, True)],
    ids=["rwkv4-zero1", "rwkv4-zero2", "rwkv4-zero3", "rwkv7-zero1", "rwkv7-zero2", "rwkv7-zero3",
         "rwkv5-zero2", "rwkv6-zero3", "rrwkv-zero2"],
)
def test_loss_falls_and_kill_resume_is_exact(arch, stage, kill, uninterrupted, demo_shards, tmp_path):
    ref, text = uninterrupted(arch, stage)
    assert f"ZeRO stage {stage}" in text and "world size 2 (torchrun/deepspeed)" in text
    recs = _train_records(ref)
    assert sorted(recs) == list(range(1, STEPS + 1))
    first, last = recs[1]["loss"], sum(recs[s]["loss"] for s in (10, 11, 12)) / 3
    assert last < first - FALL[arch], f"{arch} ZeRO {stage}: loss {first:.3f} -> {last:.3f} did not fall"
    vals = [r["val_loss"] for r in _records(ref) if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    for r in recs.values():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0
    assert (ref / "config.resolved.yaml").is_file() and any((ref / "tb").iterdir())
    # keep 3: steps 4, 8, 12 complete, nothing older
    assert all(_complete(ref, s) for s in (4, 8, 12))
    if arch == "rwkv7":
        _check_rwkv7_checkpoint(ref, stage)
    if not kill:
        return

    run_dir = tmp_path / "killed"
    # The killed run is given more steps, as an interrupted long run has (the LR schedule is pinned
    # by optim.decay_tokens, so the steps it does take are the same); it stops after step 9 for the kill.
    killed_at = _kill_after(_cmd(2, run_dir, demo_shards, f"train.zero_stage={stage}", "train.steps=1000",
                                 arch=arch),
                            tmp_path / "killed.log", run_dir, min_step=2 * EVERY + 1, min_ckpt=2 * EVERY)
    assert killed_at < STEPS, "killed too late to test anything"
    expected_resume = 2 * EVERY
    if stage == 1:
        # A corrupt newest checkpoint: truncate one of its files; resume must fall back to step 4.
        victim = sorted((run_dir / "checkpoints" / "step8").glob("*optim_states.pt"))[0]
        victim.write_bytes(victim.read_bytes()[:1000])
        expected_resume = EVERY
    text = _run(_cmd(2, run_dir, demo_shards, f"train.zero_stage={stage}", arch=arch),
                tmp_path / "resumed.log")
    resumed = run_dir / "checkpoints" / f"step{expected_resume}"
    assert f"resumed from {resumed} at step {expected_resume}" in text
    if stage == 1:
        assert "step8: skipped" in text and "truncated" in text
    _assert_same_metrics(ref, run_dir)


def _check_rwkv7_checkpoint(run_dir: Path, stage: int) -> None:
    """RWKV-7's optimizer groups as DeepSpeed saved them, and layer 0's unused v0 (never a gradient):
    untouched by every step, while the parameters that do get gradients moved."""
    import torch

    from launch.model_loading import load_any_weights

    tag = run_dir / "checkpoints" / f"step{STEPS}"
    model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    states = torch.load(tag / model_file, map_location="cpu", weights_only=False)
    optim = torch.load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
    base = optim.get("optimizer_state_dict", optim.get("base_optimizer_state"))  # ZeRO 3 / ZeRO 1-2
    assert isinstance(base, dict) and "param_groups" in base, f"ZeRO {stage}: {sorted(optim)}"
    groups = base["param_groups"]
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lr_1x", "lr_2x", "decay"}, by_name
    last_lr = _train_records(run_dir)[STEPS]["lr"]
    for name, scale, wd in (("lr_1x", 1.0, 0.0), ("lr_2x", 2.0, 0.0), ("decay", 1.0, 0.01)):
        g = by_name[name]
        assert g["my_lr_scale"] == scale and g["weight_decay"] == wd and g["eps"] == 3e-8, g
        assert g["lr"] == pytest.approx(last_lr * scale, rel=1e-12), g
    # which parameter is in which group: DeepSpeed records the names per group in param_shapes
    shapes = states["param_shapes"]
    assert len(shapes) == len(groups)
    names = [sorted(s) for s in shapes]
    i2 = [g["name"] for g in groups].index("lr_2x")
    assert names[i2] == ["blocks.0.att.w0", "blocks.1.att.w0"]
    # RWKV-LM v7 decays only the `.weight` matrices: the LoRA matrices (w1, v1, ...) stay at 1x
    decay, lr_1x = (names[[g["name"] for g in groups].index(k)] for k in ("decay", "lr_1x"))
    assert "blocks.0.att.receptance.weight" in decay and "emb.weight" in decay
    assert "blocks.0.att.v1" in lr_1x and "blocks.0.att.v0" in lr_1x

    # (a ZeRO-3 checkpoint's tensors are lazy: gathered by .contiguous())
    before, after = (
        {k: v.contiguous() for k, v in load_any_weights(run_dir / "checkpoints", tag=tag).tensors.items()}
        for tag in (f"step{EVERY}", f"step{STEPS}")
    )
    assert torch.equal(before["blocks.0.att.v0"], after["blocks.0.att.v0"])
    for k in ("blocks.1.att.v0", "blocks.0.att.w0", "blocks.1.att.receptance.weight", "emb.weight"):
        assert not torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7"])
def test_universal_resume_two_processes_to_one(arch, uninterrupted, demo_shards, tmp_path):
    """A ZeRO-2 checkpoint of 2 processes, resumed by 1 process with no launcher (ds_to_universal,
    load_universal): world 1 x grad_accum 2 reads the same global batches, so the losses continue
    the 2-process run's up to float summation order."""
    ref, _ = uninterrupted(arch, 2)
    run_dir = tmp_path / "one"
    shutil.copytree(ref, run_dir)
    (run_dir / "checkpoints" / "step12" / "complete.json").unlink()  # resume from step 8
    (run_dir / "checkpoints" / "step12" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    # A conversion killed part-way left a directory without its marker: it must be redone.
    partial = run_dir / "checkpoints" / "step8_universal"
    (partial / "zero").mkdir(parents=True)
    (partial / "zero" / "half_written.pt").write_bytes(b"partial")
    text = _run(_cmd(None, run_dir, demo_shards, "train.zero_stage=2", "train.grad_accum=2", arch=arch),
                tmp_path / "one.log")
    assert "world size 1 (single)" in text
    assert "no valid complete.json (a conversion cut short" in text
    assert "converting" in text and "ds_to_universal's progress follows" in text
    assert f"at step {2 * EVERY}" in text and "through a universal checkpoint" in text
    assert (partial / "zero").is_dir() and not (partial / "zero" / "half_written.pt").exists()
    assert (partial / "complete.json").is_file()
    a, b = _train_records(ref), _train_records(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1))
    for s in range(2 * EVERY + 1, STEPS + 1):
        assert b[s]["tokens"] == a[s]["tokens"] and b[s]["lr"] == pytest.approx(a[s]["lr"], rel=1e-12)
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=2e-4), f"step {s}"
    assert _complete(run_dir, STEPS)
    meta = json.loads((run_dir / "checkpoints" / f"step{STEPS}" / "complete.json").read_text())
    assert meta["world_size"] == 1

    # And back to 2 processes: rank 0 converts step12 while rank 1 waits on the marker file (no
    # collective pending, so a long conversion cannot hit the collective timeout).
    more = STEPS + EVERY
    text = _run(_cmd(2, run_dir, demo_shards, "train.zero_stage=2", f"train.steps={more}", arch=arch),
                tmp_path / "two.log")
    assert "rank 1: waiting for rank 0 to convert" in text
    assert f"at step {STEPS}" in text and "through a universal checkpoint" in text
    c = _train_records(run_dir)
    assert sorted(c) == list(range(1, more + 1))
    assert all(c[s]["loss"] < a[1]["loss"] - FALL[arch] for s in range(STEPS + 1, more + 1))
    meta = json.loads((run_dir / "checkpoints" / f"step{more}" / "complete.json").read_text())
    assert meta["world_size"] == 2


def _start_as_srun(run_dir: Path, manifest: str, log_dir: Path, name: str, *sets: str,
                   ntasks: int = 2) -> list[subprocess.Popen]:
    """Start the trainer the way `srun` would: one plain process per task, SLURM_* variables only
    (no RANK/WORLD_SIZE, no scontrol here: the master comes from SLURM_NODELIST).

    The tasks must be told MASTER_PORT beforehand, so another process can take it before task 0's
    store binds it: then task 0 fails with EADDRINUSE, and the tasks are started again on another
    port. Returns once the process group is up (task 0 printed its resolved config) or a task ended."""
    log0 = log_dir / f"{name}.task0.log"
    for attempt in range(ATTEMPTS):
        port, procs = free_port(), []
        for task in range(ntasks):
            env = _env()
            env.update(SLURM_PROCID=str(task), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(task),
                       SLURM_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(port))
            procs.append(subprocess.Popen(_cmd(None, run_dir, manifest, *sets), cwd=REPO, env=env,
                                          stdout=open(log_dir / f"{name}.task{task}.log", "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 300  # first use builds DeepSpeed's shm op inside init_distributed
        while "[train] resolved config:" not in log0.read_text(errors="replace"):
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                break
            time.sleep(0.1)
        lost_port = procs[0].poll() is not None and port_clash(log0.read_text(errors="replace"))
        if not lost_port or attempt == ATTEMPTS - 1:
            return procs
        for p in procs:  # task 0 lost its port: the others may be talking to whoever has it
            _kill_tree(p)
    raise AssertionError("unreachable")


def _wait_all(procs: list[subprocess.Popen], timeout: int = 240) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)


def test_srun_tasks_sigterm_checkpoint_then_nan_guard(demo_shards, tmp_path):
    """Two tasks started as srun would. SIGTERM to one task only (as a pre-empted node gets):
    both save a checkpoint at the next step boundary and exit 0. Then, resumed: injected
    non-finite losses are skipped up to train.max_nan_skips, then the run stops with an error and
    the last good checkpoint stays the newest."""
    run_dir = tmp_path / "srun"
    procs = _start_as_srun(run_dir, demo_shards, tmp_path, "term", "train.steps=1000", "checkpoint.every=0",
                           "eval.every=0")
    log0 = tmp_path / "term.task0.log"
    try:
        deadline = time.time() + 180
        while not _train_records(run_dir) or max(_train_records(run_dir)) < 3:
            assert all(p.poll() is None for p in procs) and time.time() < deadline, log0.read_text()[-4000:]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        rcs = _wait_all(procs, timeout=120)
    text = log0.read_text()
    assert rcs == [0, 0], text[-4000:]
    assert "world size 2 (slurm)" in text
    k = max(_train_records(run_dir))
    assert f"signal {int(signal.SIGTERM)}: saving a checkpoint at step {k}" in text and _complete(run_dir, k)

    bad = [k + 2, k + 3, k + 5]
    procs = _start_as_srun(run_dir, demo_shards, tmp_path, "nan", f"train.steps={k + 8}",
                           "checkpoint.every=1", "eval.every=0", f"train.fault_nan_steps={bad}",
                           "train.max_nan_skips=2")
    rcs = _wait_all(procs)
    text = (tmp_path / "nan.task0.log").read_text()
    assert rcs == [2, 2], text[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step{k}'}" in text
    assert text.count("non-finite loss at step") == 3
    assert f"non-finite loss 3 times (train.max_nan_skips = 2); stopping at step {k + 5}" in text
    recs = _train_records(run_dir)
    assert sorted(recs) == [*range(1, k + 2), k + 4]  # skipped steps log no loss
    # Checkpoints only after good steps; none after the stop.
    complete = sorted(int(p.parent.name[4:]) for p in (run_dir / "checkpoints").glob("step*/complete.json"))
    assert complete[-1] == k + 4 and k + 5 not in complete


@pytest.mark.parametrize(("precision", "arch"), [("fp32", "rwkv4"), ("bf16", "rwkv4"), ("fp32", "rwkv7")])
def test_nonfinite_step_leaves_weights_and_optimizer_state_unchanged(precision, arch, demo_shards, tmp_path):
    """tests/skip_step_check.py under torchrun, ZeRO 0, 1, 2 and 3 in one process group: NaN in rank 0's
    embedding output in the first of two micro-batches; every rank skips the step with its fp32
    master weights, Adam moments, step counts and model weights bit-identical; DeepSpeed saw finite
    (gated) gradients; the next step trains with a finite loss and does change the state."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "skip_step_check.py"), demo_shards,
           str(tmp_path), precision, arch, "0", "1", "2", "3"]
    text = _run(cmd, tmp_path / "skip.log", timeout=420)
    results = [json.loads(x[len("RESULT "):]) for x in text.splitlines() if x.startswith("RESULT ")]
    assert [r["stage"] for r in results] == [0, 1, 2, 3], text[-4000:]
    for r in results:
        assert r["arch"] == arch and r["skipped"] and r["n_bad"] == 1, r
        assert r["unchanged_all_ranks"] and r["n_tensors"] > 0, r
        assert r["changed_after"] and r["losses_finite"] and r["weights_finite"], r
        if r["stage"] > 0:  # ZeRO 0 keeps no global norm in fp32
            assert r["grad_norm_at_skip"] is not None and math.isfinite(r["grad_norm_at_skip"]), r
