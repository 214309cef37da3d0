"""Where this process sits in the job: rank, world size, local rank, rendezvous address.

Launchers describe the job differently:
- `torchrun` and the `deepspeed` launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- `srun` exports SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_NODELIST (the master is the
  first host of the node list, expanded by `scontrol show hostnames`; without scontrol, MASTER_ADDR
  must be exported, or the node list's first entry is used when it is a plain host name);
- a plain `python -m train` has none: a single process on 127.0.0.1 with a free port.

`setup_environment` normalises all of these to the torch.distributed variables *before*
`deepspeed.init_distributed`, which otherwise falls back to MPI discovery (and mpi4py).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun/deepspeed | slurm | single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: `scontrol show hostnames`, else a plain parse of `a[1-3],b`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.CalledProcessError):
            pass
    # Fallback: "node[003-005,9],gpu1" -> "node003". Covers the common compressed forms.
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun/deepspeed",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1"))
        # A port derived from the job id lets concurrent jobs on shared nodes avoid each other.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT") or _free_port()),
        launcher="single",
    )


def setup_environment() -> DistEnv:
    """Detect the job layout and export it as RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT."""
    d = detect()
    os.environ.update(
        RANK=str(d.rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_RANK=str(d.local_rank),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )
    # SLURM writes e.g. "8(x2)" for 8 tasks on each of 2 nodes.
    per_node = re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", ""))
    per_node = per_node if d.launcher == "slurm" else None
    os.environ.setdefault("LOCAL_WORLD_SIZE", per_node.group(0) if per_node else str(d.world_size))
    return d


def init_process_group(d: DistEnv) -> None:
    """deepspeed.init_distributed with gloo on CPU, nccl on CUDA; the device bound to the local rank."""
    import deepspeed
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
