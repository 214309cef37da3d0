"""Where a rank runs: its device under each way of exposing GPUs, and the SLURM master host.

No GPU here: DeepSpeed's accelerator is replaced by a stand-in that reports what a node would
(all 8 GPUs visible, or one per task under `srun --gpus-per-task=1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from train import distributed


@dataclass
class FakeAccelerator:
    kind: str
    visible: int

    def device_name(self, index: int | None = None) -> str:
        return self.kind if index is None else f"{self.kind}:{index}"

    def device_count(self) -> int:
        return self.visible


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch):
    import deepspeed.accelerator

    def use(kind: str, visible: int) -> None:
        monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator(kind, visible))

    return use


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [(0, 8, 0), (3, 8, 3), (7, 8, 7), (3, 1, 0), (7, 1, 0), (5, 2, 1)],
)
def test_device_index_all_visible_or_one_per_task(local_rank: int, visible: int, index: int) -> None:
    assert distributed.device_index(local_rank, visible) == index


def test_device_index_without_devices_says_so() -> None:
    with pytest.raises(RuntimeError, match="no accelerator device is visible"):
        distributed.device_index(2, 0)


def test_rank_device_gpus_per_task_and_cpu(accelerator) -> None:
    accelerator("cuda", 1)  # srun --gpus-per-task=1: LOCAL_RANK 3 sees only cuda:0
    assert distributed.rank_device(3) == torch.device("cuda", 0)
    accelerator("cuda", 8)
    assert distributed.rank_device(3) == torch.device("cuda", 3)
    accelerator("cpu", 4)  # DS_ACCELERATOR=cpu wins even where CUDA exists
    assert distributed.rank_device(3) == torch.device("cpu")


def test_deepspeed_args_pin_the_engine_to_the_same_device() -> None:
    # DeepSpeedEngine calls set_device(args.device_rank), else set_device(LOCAL_RANK).
    assert distributed.deepspeed_args(torch.device("cuda", 0)).device_rank == 0
    assert distributed.deepspeed_args(torch.device("cuda", 5)).device_rank == 5
    assert distributed.deepspeed_args(torch.device("cpu")).device_rank == 0


def test_init_process_group_binds_the_rank_device(accelerator, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed

    accelerator("cuda", 1)
    bound: list[torch.device] = []
    backends: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(
        deepspeed, "init_distributed", lambda dist_backend, **_: backends.append(dist_backend)
    )
    env = distributed.DistEnv(
        rank=11, world_size=16, local_rank=3, master_addr="h", master_port=1, launcher="slurm"
    )
    distributed.init_process_group(env)
    assert bound == [torch.device("cuda", 0)] and backends == ["nccl"]


def test_first_slurm_host_without_scontrol_uses_the_launch_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.multinode import expand_hostlist

    assert expand_hostlist is distributed.expand_hostlist  # one parser, not two that agree today
    monkeypatch.setattr(distributed.shutil, "which", lambda _: None)
    for nodelist in ["gpu[07-09],login", "r[1-2]n[01-02]", "node1", "a[003,5]b"]:
        assert distributed.first_slurm_host(nodelist) == expand_hostlist(nodelist)[0]
    assert distributed.first_slurm_host("a[003,5]b") == "a003b"
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "gpu[10-11]", "SLURM_JOB_ID": "5"}
    assert distributed.detect(env).master_addr == "gpu10"
    with pytest.raises(ValueError, match=r"node\[1-"):
        distributed.first_slurm_host("node[1-")
