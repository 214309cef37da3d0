"""Two nodes on one machine, started through the launch scripts, training for real.

Each "node" is one launcher invocation with one process (`--nnodes 2 --nproc-per-node 1` and the
equivalents of the deepspeed launcher and of SLURM), ZeRO-2 over gloo on the CPU. Where the test
runs as root with iproute2, the two nodes live in two network namespaces joined by a veth pair
(10.77.0.1/24 and 10.77.0.2/24, addresses that exist only inside the namespaces this test creates
and always deletes), so rendezvous and collectives cross a real interface; elsewhere both nodes
share the loopback interface.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from machine import ATTEMPTS, free_port, port_clash

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
VENV_BIN = str(Path(sys.executable).parent)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REPO / "train" / "__main__.py").is_file(), reason="the trainer (python -m train) is not there"
    ),
]


@dataclass
class Node:
    rank: int
    addr: str
    ifname: str
    prefix: list[str]  # runs a command inside this node's network namespace (empty: the host's)


@functools.cache
def netns_unavailable() -> str | None:
    """Why two network namespaces cannot be made here (None: they can), probed once."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"rwkvprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    # the pair needs veth links too (a kernel or container can allow namespaces but not veth)
    veth = [f"rwkvp{os.getpid() % 100000}{x}" for x in "ab"]
    made = subprocess.run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]],
                          capture_output=True, text=True, timeout=30)
    subprocess.run(["ip", "link", "del", veth[0]], capture_output=True, timeout=30)
    if made.returncode != 0:
        return f"`ip link add ... type veth` failed: {made.stderr.strip()}"
    return None


@contextlib.contextmanager
def netns_pair() -> Iterator[tuple[Node, Node]]:
    """Two namespaces joined by a veth pair; removed afterwards whatever happens."""
    tag = f"{os.getpid() % 100000}"
    ns = [f"rwkvt{tag}n0", f"rwkvt{tag}n1"]
    veth = [f"rwkv{tag}a", f"rwkv{tag}b"]  # interface names: 15 characters at most
    addrs = ["10.77.0.1", "10.77.0.2"]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    try:
        for n in ns:
            ip("netns", "add", n)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addrs, strict=True):
            ip("link", "set", v, "netns", n)
            ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            ip("-n", n, "link", "set", v, "up")
            ip("-n", n, "link", "set", "lo", "up")
        yield tuple(Node(i, addrs[i], veth[i], ["ip", "netns", "exec", ns[i]]) for i in range(2))
    finally:
        for n in ns:  # deleting a namespace deletes the veth end inside it, and so the pair
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", veth[0]], capture_output=True, timeout=30)


@pytest.fixture(params=["netns", "loopback"])
def two_nodes(request) -> Iterator[tuple[Node, Node]]:
    """Two nodes in two network namespaces where they can be made, else on the loopback interface."""
    reason = netns_unavailable()
    if request.param == "netns":
        if reason is not None:
            pytest.skip(f"two nodes in network namespaces: {reason}")
        with netns_pair() as nodes:
            yield nodes
    else:
        if reason is None:
            pytest.skip("the network-namespace variant runs here and covers this one")
        yield Node(0, "127.0.0.1", "lo", []), Node(1, "127.0.0.1", "lo", [])


def write_config(tmp: Path, manifest: str, run_dir: Path, steps: int) -> Path:
    cfg = {
        "run_dir": str(run_dir),
        "seed": 7,
        "model": {"preset": "tiny", "vocab_size": "auto"},
        "data": {"manifests": [manifest], "val_documents": 4},
        "train": {"ctx_len": 64, "micro_batch_size": 2, "steps": steps, "precision": "bf16", "zero_stage": 2},
        # torch AdamW: no fused_adam build; constant lr so a run's steps do not change the schedule
        "optim": {"name": "torch_adamw", "lr_init": 1e-3, "lr_final": 1e-3, "decay": "constant"},
        "eval": {"every": 0},
        "checkpoint": {"every": 4, "keep": 5},
        "log": {"tensorboard": False, "progress": False},
    }
    path = tmp / f"run_{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_node(
    how: str, nodes: tuple[Node, Node], rank: int, port: int, config: Path, log: Path
) -> subprocess.Popen:
    """Start node `rank`'s share of the job through one of the three launch paths (1 process a node)."""
    node, master = nodes[rank], nodes[0]
    env = {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ["PATH"],
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": node.ifname,
        "PYTHON": sys.executable,
        "DEEPSPEED_TIMEOUT": "3",  # minutes: bounds any collective that waits for a dead peer
    }
    train_args = ["--config", str(config)]
    if how == "torchrun":
        cmd = ["bash", str(LAUNCH / "torchrun.sh"), "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(rank), "--rdzv-endpoint", f"{master.addr}:{port}",
               "--local-addr", node.addr, "--rdzv-id", "test", "--", *train_args]  # fmt: skip
    elif how == "deepspeed":
        hostfile = config.with_name("hostfile")
        # a host may appear once: on the loopback the two nodes are two spellings of one host
        hosts = [n.addr for n in nodes] if nodes[0].addr != nodes[1].addr else ["127.0.0.1", "localhost"]
        hostfile.write_text("".join(f"{h} slots=1\n" for h in hosts))
        cmd = ["bash", str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile), "--no-ssh",
               "--node-rank", str(rank), "--master-addr", master.addr, "--master-port", str(port),
               "--", *train_args]  # fmt: skip
    elif how == "slurm":  # the variables srun sets for each task of 2 nodes x 1 task
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID=str(rank),
                   SLURM_NTASKS_PER_NODE="1", SLURM_JOB_ID="4242", MASTER_ADDR=master.addr,
                   MASTER_PORT=str(port))  # fmt: skip
        cmd = ["bash", str(LAUNCH / "slurm_task.sh"), *train_args]
    else:
        raise ValueError(how)
    with open(log, "ab") as f:
        return subprocess.Popen([*node.prefix, *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def lost_port(procs: list[subprocess.Popen], logs: list[Path], offsets: list[int]) -> bool:
    """Waits until node 0's trainer has its process group (it prints its resolved config) or a node
    ends; True when a node ended because its port was taken (its log since offset says so)."""
    def since(i: int) -> str:
        with open(logs[i], "rb") as f:
            f.seek(offsets[i])
            return f.read().decode(errors="replace")

    deadline = time.time() + 300  # first use builds DeepSpeed's shm op inside init_distributed
    while "[train] resolved config:" not in since(0) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    return any(p.poll() is not None and port_clash(since(i)) for i, p in enumerate(procs))


def wait_all(procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_node(q)
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)
            pytest.fail(f"launch did not finish within {timeout:.0f} s\n{tails}")
    return [p.returncode for p in procs]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a node at once, as a crashed machine would."""
    for pid in process_tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def complete_steps(ckpt_dir: Path) -> list[int]:
    return sorted(
        int(p.parent.name[4:]) for p in ckpt_dir.glob("step*/complete.json") if p.parent.name[4:].isdigit()
    )


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
    return [r["step"] for r in rows if "step" in r and "loss" in r]


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen]]:
    """Launched nodes, killed at teardown whatever the test did (before the namespaces go)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        kill_node(proc)
        proc.wait()


def test_two_nodes_train_die_together_and_resume(tmp_path: Path, demo_shards, two_nodes, reaper) -> None:
    """ZeRO-2 over two "nodes": torchrun.sh runs to completion; a second run killed on node 1 makes
    node 0 exit non-zero within a bounded time; launching again (deepspeed.sh --no-ssh, then the
    SLURM task script) resumes from the newest complete checkpoint and finishes."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    def tails(logs: list[Path]) -> str:
        return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)

    nodes = two_nodes

    def launch(how: str, phase: str, steps: int) -> tuple[list[subprocess.Popen], list[Path]]:
        config = write_config(tmp_path, str(demo_shards), run_dir, steps)
        logs = [tmp_path / f"{phase}_node{r}.log" for r in range(2)]
        for attempt in range(ATTEMPTS):
            # Both nodes must be told the port beforehand. A free one, found where node 0 listens: in
            # its namespace nothing but this test's processes can take it; on the loopback another
            # process can, before node 0 binds it, and then the nodes start again on another port.
            port = free_port(nodes[0].prefix)
            offsets = [log.stat().st_size if log.exists() else 0 for log in logs]
            procs = [launch_node(how, nodes, r, port, config, logs[r]) for r in range(2)]
            reaper.extend(procs)
            if attempt == ATTEMPTS - 1 or not lost_port(procs, logs, offsets):
                return procs, logs
            for p in procs:
                kill_node(p)
                p.wait()
        raise AssertionError("unreachable")

    def run_to_end(how: str, phase: str, steps: int) -> str:
        procs, logs = launch(how, phase, steps)
        assert wait_all(procs, 240, logs) == [0, 0], tails(logs)
        assert complete_steps(ckpts)[-1] == steps and metric_steps(run_dir)[-1] == steps
        return logs[0].read_text(errors="replace")

    # 1. a short run to completion
    run_to_end("torchrun", "first", steps=8)

    # 2. continue towards a far step; kill every process of node 1 after a new checkpoint
    procs, logs = launch("torchrun", "killed", steps=400)
    deadline = time.time() + 240
    while complete_steps(ckpts)[-1] < 12:
        assert time.time() < deadline, "no new checkpoint after resuming\n" + tails(logs)
        assert all(p.poll() is None for p in procs), "a node exited before the kill\n" + tails(logs)
        time.sleep(0.2)
    kill_node(procs[1])
    t_kill = time.time()
    try:
        rc0 = procs[0].wait(timeout=200)
    except subprocess.TimeoutExpired:
        kill_node(procs[0])
        pytest.fail("node 0 kept running for 200 s after node 1 was killed\n" + tails(logs))
    procs[1].wait()
    print(f"node 0 exited with status {rc0}, {time.time() - t_kill:.1f} s after node 1 was killed")
    assert rc0 != 0, "node 0 exited 0 although its peer died mid-run"
    assert f"resumed from {ckpts / 'step8'} at step 8" in logs[0].read_text(errors="replace")
    resume_from = complete_steps(ckpts)[-1]
    assert 12 <= resume_from < 400

    # 3. launching again resumes from the newest complete checkpoint and finishes (deepspeed launcher)
    log0 = run_to_end("deepspeed", "resumed", steps=resume_from + 4)
    assert f"resumed from {ckpts / f'step{resume_from}'} at step {resume_from}" in log0

    # 4. and once more as SLURM tasks
    log0 = run_to_end("slurm", "slurm", steps=resume_from + 8)
    assert f"resumed from {ckpts / f'step{resume_from + 4}'} at step {resume_from + 4}" in log0
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps))  # metrics are cut back to each resume point: no step twice
