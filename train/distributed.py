"""Where this process sits in the job: rank, world size, local rank, rendezvous address.

Launchers describe the job differently:
- `torchrun` and the `deepspeed` launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- `srun` exports SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_NODELIST (the master is the
  first host of the node list, expanded by `scontrol show hostnames`, or without scontrol by
  `expand_hostlist`, the parser the launch scripts use too);
- a plain `python -m train` has none: a single process on 127.0.0.1 with a free port.

`setup_environment` normalises all of these to the torch.distributed variables *before*
`deepspeed.init_distributed`, which otherwise falls back to MPI discovery (and mpi4py).
`rank_device` is the one rule for which device a rank uses, whatever the launcher made visible.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the launch scripts import this module for its parser
    import torch


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


_BRACKET = re.compile(r"\[([^\]]*)\]")


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {nodelist!r}")
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {nodelist!r}")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {nodelist!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {nodelist!r}")
        width = len(lo)  # zero padding follows the lower bound, as SLURM does
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: `node[01-02],gpu[1,3-4]x` -> node01 node02 gpu1x ...

    The one parser of node lists in the repository: the trainer (first_slurm_host) and the launch
    scripts (`python -m launch.multinode hostnames`, off a cluster) both use it."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(part):
            names = [n + part[pos : m.start()] for n in names]
            names = [n + r for n in names for r in _expand_range(m.group(1), nodelist)]
            pos = m.end()
        hosts.extend(n + part[pos:] for n in names)
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: `scontrol show hostnames` (authoritative), else expand_hostlist."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.CalledProcessError):
            pass
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts[0]


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


def device_index(local_rank: int, visible: int) -> int:
    """Index, among the devices this process can see, of the rank's device: local_rank % visible.

    With every GPU of the node visible (`--gpus-per-node`, torchrun, the deepspeed launcher), rank
    L takes cuda:L. Under `srun --gpus-per-task=1` (or any launcher that sets CUDA_VISIBLE_DEVICES
    per rank) each task sees one device, which is cuda:0 whatever its LOCAL_RANK; the modulo gives
    both without reading SLURM's variables."""
    if visible < 1:
        raise RuntimeError(f"local rank {local_rank}: no accelerator device is visible to this process")
    return local_rank % visible


def rank_device(local_rank: int) -> torch.device:
    """The one device this rank trains on. Everything that needs it asks here (the process group, the
    trainer's tensors, DeepSpeed's engine through deepspeed_args), so they cannot disagree.

    DeepSpeed's accelerator decides the kind, not torch.cuda.is_available(): DS_ACCELERATOR=cpu must
    win on a GPU host."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    kind = accel.device_name()  # "cuda", "cpu", "xpu", ... without an index
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, device_index(local_rank, accel.device_count()))


def deepspeed_args(device: torch.device) -> SimpleNamespace:
    """`args` for deepspeed.initialize: without it the engine calls set_device(LOCAL_RANK), which is
    out of range when each task sees one GPU (LOCAL_RANK 3, only cuda:0 visible)."""
    return SimpleNamespace(device_rank=device.index if device.index is not None else 0)


def init_process_group(d: DistEnv) -> None:
    """deepspeed.init_distributed with gloo on CPU, nccl on CUDA; the rank's device made current."""
    import deepspeed
    import torch

    device = rank_device(d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
