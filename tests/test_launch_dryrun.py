"""The launch scripts' dry-run output: each node's command names the right rank and addresses.

The scripts are run for real with DRY_RUN=1 and their output parsed here; the expected ranks,
hosts and addresses are worked out from the inputs, not from the scripts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.multinode import expand_hostlist

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
NODE_LINE = re.compile(r"^node_rank=(\S+) host=(\S+): (.*)$")
HOST_DEPENDENT = (
    "OMP_NUM_THREADS",
    "TORCH_CUDA_ARCH_LIST",
    "TORCH_EXTENSIONS_DIR",
    "TRITON_CACHE_DIR",
    "RWKV_NODE_ENV",
)


def run_script(args: list[str], env_extra: dict[str, str] | None = None, check: bool = True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_"))}
    for k in HOST_DEPENDENT:  # what the scripts work out themselves must not leak in from the caller
        env.pop(k, None)
    env.update({"DRY_RUN": "1", "PYTHON": sys.executable})
    env.update(env_extra or {})
    proc = subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def node_lines(stdout: str) -> list[tuple[int, str, list[str]]]:
    out = []
    for line in stdout.splitlines():
        m = NODE_LINE.match(line)
        if m:
            out.append((int(m.group(1)), m.group(2), shlex.split(m.group(3))))
    return out


def option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def env_lines(stdout: str) -> dict[str, str]:
    pairs = [line[len("env: ") :].split("=", 1) for line in stdout.splitlines() if line.startswith("env: ")]
    return dict(pairs)


TRAIN_ARGS = ["--config", "configs/demo.yaml", "--set", "run_dir=runs/with space"]


def test_deepspeed_hostfile_ssh_form(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\ngpu-a slots=8\n\ngpu-b slots=8   # second\ngpu-c slots=4\n")
    proc = run_script([str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile), "--", *TRAIN_ARGS])
    launcher = [
        shlex.split(line.split(": ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("launcher ")
    ]
    assert len(launcher) == 1
    cmd = launcher[0]
    assert cmd[0] == "deepspeed" and option(cmd, "--hostfile") == str(hostfile)
    assert option(cmd, "--master_addr") == "gpu-a" and "--no_ssh" not in cmd
    assert cmd[cmd.index("--module") + 1 :] == ["train", *TRAIN_ARGS]
    nodes = node_lines(proc.stdout)
    assert [(rank, host) for rank, host, _ in nodes] == [(0, "gpu-a"), (1, "gpu-b"), (2, "gpu-c")]
    for rank, _, cmd in nodes:
        assert option(cmd, "--node_rank") == str(rank) and "--no_ssh" in cmd
        assert option(cmd, "--master_addr") == "gpu-a"


def test_deepspeed_no_ssh_form_one_node_and_all(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("10.1.0.5 slots=2\n10.1.0.6 slots=2\n")
    args = [str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile), "--no-ssh", "--master-port", "31000"]
    nodes = node_lines(run_script([*args, "--master-addr", "10.1.0.5", "--", *TRAIN_ARGS]).stdout)
    assert [(r, h) for r, h, _ in nodes] == [(0, "10.1.0.5"), (1, "10.1.0.6")]
    one = node_lines(run_script([*args, "--node-rank", "1", "--", *TRAIN_ARGS]).stdout)
    assert len(one) == 1
    rank, host, cmd = one[0]
    assert (rank, host, option(cmd, "--node_rank")) == (1, "10.1.0.6", "1")
    assert option(cmd, "--master_addr") == "10.1.0.5" and option(cmd, "--master_port") == "31000"
    bad = run_script([*args, "--node-rank", "2"], check=False)
    assert bad.returncode != 0 and "--node-rank 2" in bad.stderr


@pytest.mark.parametrize(
    "text, problem",
    [
        ("gpu-a slots=8\ngpu-a slots=8\n", "listed twice"),
        ("gpu-a 8\n", "expected 'HOSTNAME slots=N'"),
        ("# nothing\n", "no hosts"),
    ],
)
def test_deepspeed_bad_hostfile_names_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(text)
    proc = run_script([str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile)], check=False)
    assert proc.returncode != 0
    assert str(hostfile) in proc.stderr and problem in proc.stderr
    missing = run_script([str(LAUNCH / "deepspeed.sh"), "--hostfile", str(tmp_path / "nope")], check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_torchrun_c10d_per_node_commands() -> None:
    proc = run_script(
        [
            str(LAUNCH / "torchrun.sh"),
            "--hosts",
            "10.2.0.1,10.2.0.2,10.2.0.3",
            "--nproc-per-node",
            "4",
            "--rdzv-id",
            "job7",
            "--",
            *TRAIN_ARGS,
        ]
    )
    nodes = node_lines(proc.stdout)
    assert [(r, h) for r, h, _ in nodes] == [(0, "10.2.0.1"), (1, "10.2.0.2"), (2, "10.2.0.3")]
    for rank, host, cmd in nodes:
        assert cmd[0] == "torchrun"
        assert option(cmd, "--nnodes") == "3" and option(cmd, "--nproc_per_node") == "4"
        assert option(cmd, "--rdzv_backend") == "c10d" and option(cmd, "--rdzv_id") == "job7"
        assert option(cmd, "--rdzv_endpoint") == "10.2.0.1:29400"
        assert option(cmd, "--node_rank") == str(rank) and option(cmd, "--local_addr") == host
        # node 0 hosts the rendezvous store, and no other node tries to
        assert option(cmd, "--rdzv_conf") == ("is_host=1" if rank == 0 else "is_host=0")
        assert cmd[cmd.index("-m") + 1 :] == ["train", *TRAIN_ARGS]


def test_torchrun_single_node_line_and_errors() -> None:
    script = str(LAUNCH / "torchrun.sh")
    one = node_lines(
        run_script(
            [
                script,
                "--nnodes",
                "2",
                "--rdzv-endpoint",
                "head:1234",
                "--node-rank",
                "1",
                "--local-addr",
                "10.3.0.2",
            ]
        ).stdout
    )
    assert len(one) == 1 and one[0][:2] == (1, "10.3.0.2")
    assert option(one[0][2], "--rdzv_endpoint") == "head:1234"
    assert option(one[0][2], "--rdzv_conf") == "is_host=0"
    no_endpoint = run_script([script, "--nnodes", "2"], check=False)
    assert no_endpoint.returncode != 0 and "--rdzv-endpoint" in no_endpoint.stderr
    bad_rank = run_script([script, "--nnodes", "2", "--rdzv-endpoint", "h", "--node-rank", "2"], check=False)
    assert bad_rank.returncode != 0 and "--node-rank 2" in bad_rank.stderr


def test_slurm_tasks_ranks_and_master() -> None:
    proc = run_script(
        [str(LAUNCH / "slurm.sbatch"), *TRAIN_ARGS],
        {
            "SLURM_JOB_NODELIST": "gpu[07-09]",
            "SLURM_NNODES": "3",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_ID": "4242",
            "SLURM_SUBMIT_DIR": str(REPO),
        },
    )
    srun = [
        shlex.split(line.split(": ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("launcher ")
    ][0]
    assert srun[0] == "srun" and option(srun, "--ntasks") == "6" and "--kill-on-bad-exit=1" in srun
    assert srun[-len(TRAIN_ARGS) :] == TRAIN_ARGS
    tasks = node_lines(proc.stdout)
    assert len(tasks) == 6
    seen = []
    for node, host, cmd in tasks:
        assign = dict(a.split("=", 1) for a in cmd[1:] if re.match(r"^[A-Z_]+=", a))
        assert host == ["gpu07", "gpu08", "gpu09"][node]
        assert int(assign["RANK"]) == node * 2 + int(assign["LOCAL_RANK"])
        assert assign["WORLD_SIZE"] == "6" and assign["MASTER_ADDR"] == "gpu07"
        assert assign["MASTER_PORT"] == str(20000 + 4242 % 20000)
        seen.append(int(assign["RANK"]))
    assert sorted(seen) == list(range(6))


def test_common_env_passthrough_and_caller_wins() -> None:
    proc = run_script(
        [str(LAUNCH / "torchrun.sh"), "--nnodes", "1", "--rdzv-endpoint", "h"],
        {
            "NCCL_IB_HCA": "mlx5_0,mlx5_1",
            "NCCL_SOCKET_IFNAME": "ib0",
            "GLOO_SOCKET_IFNAME": "eth7",
            "OMP_NUM_THREADS": "6",
            "UNRELATED_VAR": "x",
        },
    )
    env = env_lines(proc.stdout)
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["GLOO_SOCKET_IFNAME"] == "eth7" and env["OMP_NUM_THREADS"] == "6"
    assert "TORCH_EXTENSIONS_DIR" in env and "TRITON_CACHE_DIR" in env and "UNRELATED_VAR" not in env


def test_deepspeed_env_file_is_what_the_launcher_parses(tmp_path: Path) -> None:
    # The ssh runner reads DS_ENV_FILE line by line as KEY=VALUE (split once on '=').
    env_file = tmp_path / "ds_env"
    subprocess.run(
        ["bash", "-c", f"source {LAUNCH / 'env.sh'} && rwkv_write_ds_env_file {env_file}"],
        check=True,
        env={**os.environ, "NCCL_IB_GID_INDEX": "3", "NCCL_DEBUG": "INFO"},
    )
    parsed = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert parsed["NCCL_IB_GID_INDEX"] == "3" and parsed["NCCL_DEBUG"] == "INFO"
    assert parsed["PYTHONPATH"].split(":")[0] == str(REPO)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[08-11],login", ["gpu08", "gpu09", "gpu10", "gpu11", "login"]),
        ("a[1,3-4]b,c[9-10]", ["a1b", "a3b", "a4b", "c9", "c10"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ],
)
def test_expand_hostlist(nodelist: str, hosts: list[str]) -> None:
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-", "node]1[", "node[a-b]", "node[3-1]"])
def test_expand_hostlist_rejects_malformed(nodelist: str) -> None:
    with pytest.raises(ValueError, match=re.escape(nodelist)):
        expand_hostlist(nodelist)


# ------------------------------------------------------------------------------------ SLURM + node env
def fake_nvidia_smi(bin_dir: Path, caps: list[str] | None) -> dict[str, str]:
    """An `nvidia-smi` on PATH reporting GPUs of the given compute capabilities; None: a driver too
    old for the compute_cap field (it fails, as the real one does)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    if caps is None:
        body = 'echo "Field \\"compute_cap\\" is not a valid field to query." >&2; exit 2'
    else:
        body = "\n".join(
            [
                'case "$*" in',
                "  *-L*) " + "; ".join(f"echo 'GPU {i}: H100 (UUID: x)'" for i in range(len(caps))) + " ;;",
                "  *compute_cap*) " + "; ".join(f"echo ' {c}'" for c in caps) + " ;;",
                "esac",
            ]
        )
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def slurm_job_env(**extra: str) -> dict[str, str]:
    return {
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(REPO),
        **extra,
    }


def srun_line(stdout: str) -> list[str]:
    return [
        shlex.split(line.split(": ", 1)[1]) for line in stdout.splitlines() if line.startswith("launcher ")
    ][0]


def test_slurm_signal_directive_warns_the_tasks_before_the_kill() -> None:
    directives = [
        line.split(None, 1)[1]
        for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    signal = [d for d in directives if d.startswith("--signal")]
    assert len(signal) == 1, directives
    # USR1 (which the trainer turns into checkpoint-and-exit), to the tasks (no "B:" = not only the
    # batch shell), early enough to write a big checkpoint.
    m = re.fullmatch(r"--signal=USR1@(\d+)", signal[0])
    assert m and int(m.group(1)) >= 600, signal[0]


@pytest.mark.parametrize("cpus", ["12", None])
def test_slurm_passes_cpus_per_task_to_srun_and_threads(tmp_path: Path, cpus: str | None) -> None:
    extra = {"SLURM_CPUS_PER_TASK": cpus} if cpus else {}
    path = fake_nvidia_smi(tmp_path / "bin", ["9.0"])
    proc = run_script([str(LAUNCH / "slurm.sbatch"), *TRAIN_ARGS], {**slurm_job_env(**extra), **path})
    srun = srun_line(proc.stdout)
    assert option(srun, "--cpus-per-task") == cpus
    env = env_lines(proc.stdout)
    assert env["OMP_NUM_THREADS"] == (cpus or "1")
    # The batch shell runs on node 0 only and srun copies its environment to all tasks: node 0's GPU
    # arch must not travel to nodes that may have other GPUs.
    assert "TORCH_CUDA_ARCH_LIST" not in env and "TORCH_EXTENSIONS_DIR" not in env


def test_slurm_task_works_out_its_own_node_env(tmp_path: Path) -> None:
    """What one task really starts: slurm_task.sh with srun's variables and the batch shell's environment
    (RWKV_NODE_ENV=defer leaking in), on a node with A100s. A stub python prints what it was given."""
    stub = tmp_path / "python"
    stub.write_text(
        "#!/bin/sh\nfor v in RANK LOCAL_RANK WORLD_SIZE OMP_NUM_THREADS TORCH_CUDA_ARCH_LIST "
        'TORCH_EXTENSIONS_DIR; do eval echo "$v=\\$$v"; done\necho "ARGS=$*"\n'
    )
    stub.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_")) and k not in HOST_DEPENDENT
    }
    env.update(fake_nvidia_smi(tmp_path / "bin", ["8.0", "8.0"]))
    env.update(
        PYTHON=str(stub),
        HOME=str(tmp_path),
        RWKV_NODE_ENV="defer",
        SLURM_PROCID="3",
        SLURM_NTASKS="4",
        SLURM_LOCALID="1",
        SLURM_CPUS_PER_TASK="6",
        SLURM_NTASKS_PER_NODE="2",
        MASTER_ADDR="gpu07",
        MASTER_PORT="20077",
    )
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm_task.sh"), "--config", "c.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert (got["RANK"], got["LOCAL_RANK"], got["WORLD_SIZE"]) == ("3", "1", "4")
    assert got["OMP_NUM_THREADS"] == "6" and got["TORCH_CUDA_ARCH_LIST"] == "8.0"
    assert got["TORCH_EXTENSIONS_DIR"] == f"{tmp_path}/.cache/torch_extensions/sm80"
    assert got["ARGS"] == "-m train --config c.yaml"


@pytest.mark.parametrize(
    "caps, given, arch, ext_suffix",
    [
        (["9.0", "9.0"], None, "9.0", "/sm90"),
        (["8.0", "9.0"], None, "8.0;9.0", "/sm8090"),
        (["9.0"], "8.6", "8.6", "/sm86"),  # the caller's value wins
        (None, "8.0 9.0+PTX", "8.0 9.0+PTX", "/sm8090PTX"),  # torch's other spelling: still one path word
        (None, None, None, ""),  # driver without compute_cap: leave it to torch
    ],
)
def test_torch_cuda_arch_list_from_nvidia_smi(
    tmp_path: Path, caps: list[str] | None, given: str | None, arch: str | None, ext_suffix: str
) -> None:
    extra = {**fake_nvidia_smi(tmp_path / "bin", caps), "HOME": str(tmp_path)}
    if given:
        extra["TORCH_CUDA_ARCH_LIST"] = given
    proc = run_script([str(LAUNCH / "torchrun.sh"), "--nnodes", "1", "--rdzv-endpoint", "h"], extra)
    env = env_lines(proc.stdout)
    assert env.get("TORCH_CUDA_ARCH_LIST") == arch
    assert env["TORCH_EXTENSIONS_DIR"] == f"{tmp_path}/.cache/torch_extensions{ext_suffix}"


def fake_nproc(bin_dir: Path, cores: int) -> dict[str, str]:
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "nproc").write_text(f"#!/bin/sh\necho {cores}\n")
    (bin_dir / "nproc").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "extra, threads",
    [({}, "4"), ({"OMP_NUM_THREADS": "6"}, "6"), ({"SLURM_CPUS_PER_TASK": "3"}, "3")],
)
def test_torchrun_ranks_share_the_node_cores(tmp_path: Path, extra: dict[str, str], threads: str) -> None:
    """16 cores, 4 ranks: 4 OpenMP threads each (DeepSpeedCPUAdam's step with offload); the caller's
    value, or SLURM's cores per task, win."""
    env = {**fake_nproc(tmp_path / "bin", 16), **extra}
    proc = run_script(
        [str(LAUNCH / "torchrun.sh"), "--nnodes", "1", "--nproc-per-node", "4", "--rdzv-endpoint", "h"], env
    )
    assert env_lines(proc.stdout)["OMP_NUM_THREADS"] == threads


def test_deepspeed_node_threads_follow_its_slots(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\nb slots=2\n")
    args = [str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile), "--no-ssh", "--master-addr", "a"]
    env = fake_nproc(tmp_path / "bin", 16)
    for node, threads in (("0", "2"), ("1", "8")):
        proc = run_script([*args, "--node-rank", node], env)
        assert env_lines(proc.stdout)["OMP_NUM_THREADS"] == threads
    bad = run_script([*args, "--node-rank", "x"], env, check=False)
    assert bad.returncode != 0 and "--node-rank x" in bad.stderr
