"""ds_config.json's ZeRO 1/2 communication settings: how "auto" buckets are sized, and that
overlapping communication with small buckets trains exactly as one synchronous bucket does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import PRESETS
from train.ds_config import BUCKET_CAP, BUCKET_FLOOR, fill_ds_config, load_ds_config, zero12_bucket_size
from train.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def filled(*sets: str, ds: dict | None = None, world_size: int = 2) -> dict:
    cfg = load_run_config(TINY, ["data.manifests=[m.json]", *sets])
    return fill_ds_config(ds or load_ds_config(REPO / "ds_config.json"), cfg, world_size=world_size)


def test_zero2_overlaps_communication_with_contiguous_buckets() -> None:
    zero = filled("train.zero_stage=2")["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_scatter"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == BUCKET_FLOOR


def test_one_process_does_not_overlap() -> None:
    """Nothing to overlap alone, and DeepSpeed's overlap path syncs the device per bucket."""
    assert filled("train.zero_stage=2", world_size=1)["zero_optimization"]["overlap_comm"] is False
    explicit = load_ds_config(REPO / "ds_config.json")
    explicit["zero_optimization"]["overlap_comm"] = True  # written in the file: kept
    assert filled(ds=explicit, world_size=1)["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize(
    "n_embd, size", [(128, BUCKET_FLOOR), (5120, BUCKET_FLOOR), (10_000, 100_000_000), (40_000, BUCKET_CAP)]
)
def test_auto_buckets_follow_the_model_width(n_embd: int, size: int) -> None:
    assert zero12_bucket_size(n_embd) == size
    zero = filled(f"model.n_embd={n_embd}")["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == size


def test_every_preset_gets_large_enough_buckets() -> None:
    # n_embd^2 alone (HF's "auto") would give 16K-26M elements: latency-bound collectives.
    for name, preset in PRESETS.items():
        size = zero12_bucket_size(preset["n_embd"])
        assert BUCKET_FLOOR <= size <= BUCKET_CAP, name
        assert filled(f"model.preset={name}")["zero_optimization"]["reduce_bucket_size"] == size


def test_numbers_in_ds_config_are_kept() -> None:
    ds = load_ds_config(REPO / "ds_config.json")
    ds["zero_optimization"].update(reduce_bucket_size=123_456_789, allgather_bucket_size=5e8)
    zero = filled(ds=ds)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123_456_789 and zero["allgather_bucket_size"] == 5e8


OVERLAP_SCRIPT = r"""
import json, os, sys
import torch
import torch.nn.functional as F
import deepspeed
from train.distributed import deepspeed_args, rank_device

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
base = json.loads(sys.argv[1])
final = {}
variants = {"overlap": (True, 3000), "sync": (False, 10**8)}  # overlap_comm, bucket size
for name, (overlap, bucket) in variants.items():
    zero = {"overlap_comm": overlap, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(97, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 97))
    cfg = json.loads(json.dumps(base))
    cfg["zero_optimization"].update(zero)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    device = rank_device(int(os.environ["LOCAL_RANK"]))  # as the trainer: the engine on the rank's device
    engine, *_ = deepspeed.initialize(args=deepspeed_args(device), model=model, optimizer=opt, config=cfg)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(3):
        x = torch.randint(0, 97, (4, 17), generator=g)
        loss = F.cross_entropy(engine(x[:, :-1]).float().reshape(-1, 97), x[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    final[name] = [p.detach().float().clone() for p in engine.module.parameters()]
same = all(torch.equal(a, b) for a, b in zip(final["overlap"], final["sync"], strict=True))
diff = max(float((a - b).abs().max()) for a, b in zip(final["overlap"], final["sync"], strict=True))
print(f"rank {rank}: overlap == sync: {same} (max difference {diff})", flush=True)
torch.distributed.barrier()
sys.stdout.flush()
# DeepSpeed's overlap_comm with gloo on CPU can abort in interpreter teardown ("terminate called
# without an active exception") after all work is done and printed; skip the teardown.
os._exit(0 if same else 1)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("precision", ["bf16"])
def test_overlap_comm_with_many_buckets_trains_exactly_like_one_bucket(
    tmp_path: Path, precision: str
) -> None:
    """Two processes over gloo, the shipped ZeRO-2 settings: overlap_comm with buckets a few thousand
    elements small (so a step has dozens of them in flight) ends 3 steps with the same weights, bit
    for bit, as synchronous reduction in one bucket."""
    ds = filled("train.zero_stage=2", f"train.precision={precision}")
    ds.pop("optimizer", None)  # tiny.yaml's torch_adamw: the script passes its own
    script = tmp_path / "overlap.py"
    script.write_text(OVERLAP_SCRIPT)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        json.dumps(ds),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "Error" in line or "overlap == sync" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + "\n" + out[-3000:]
    assert proc.stdout.count("overlap == sync: True") == 2, proc.stdout[-3000:]


def test_adam_eps_defaults_to_the_architectures_and_a_set_value_wins() -> None:
    """RWKV-LM trains x070 with Adam eps 1e-18 and v4 with 1e-8; optim.eps, when given, is used as is."""
    adam = ["optim.name=adam"]
    rwkv7 = "model.preset=rwkv7-tiny"
    runs = [(), (rwkv7,), ("model.arch=rwkv7",), (rwkv7, "optim.eps=1e-6")]
    eps = [filled(*adam, *sets)["optimizer"]["params"]["eps"] for sets in runs]
    assert eps == [1e-8, 1e-18, 1e-18, 1e-6]
