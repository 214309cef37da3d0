"""ZeRO-3 construction: RWKV built under deepspeed.zero.Init in 2 processes (parameters partitioned
as they are created) gets exactly the initial weights of a plain build with the same seed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import ModelConfig
from train.model import RWKV

REPO = Path(__file__).resolve().parents[1]
SEED = 1234

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# per preset: the overrides that make it small (RWKV-6/7 heads are 64 wide: two of them; RWKV-6 covers
# RWKV-5's init code as well, plus its uniform LoRA factors)
SMALL = {
    "tiny": {"n_layer": 3, "n_embd": 64, "vocab_size": 300},
    "rwkv7-tiny": {"n_layer": 3, "n_embd": 128, "vocab_size": 300},
    "rwkv6-tiny": {"n_layer": 3, "n_embd": 128, "vocab_size": 300},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", list(SMALL))
def test_zero_init_build_equals_plain_build(preset, precision, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "zero_init"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_port()), str(REPO / "tests" / "zero_init_worker.py"), str(out), precision, str(SEED), preset,
           json.dumps(SMALL[preset])]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # The workers run one thread each; LAPACK's QR (orthogonal init) rounds differently with
    # another thread count, so the plain build uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        plain = RWKV(ModelConfig.from_preset(preset, **SMALL[preset]))
    finally:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    expected = {n: p.detach().to(dtype) for n, p in plain.named_parameters()}
    n_params = sum(p.numel() for p in plain.parameters())
    for rank in (0, 1):
        got = torch.load(f"{out}.rank{rank}.pt", weights_only=True)
        assert got["placeholders"], "parameters were not partitioned at construction"
        # each rank keeps about half of every parameter (partitions are padded to the world size)
        assert n_params / 2 <= got["local_numel"] <= n_params / 2 + 2 * len(expected)
        assert sorted(got["params"]) == sorted(expected)
        for name, value in expected.items():
            g = got["params"][name]
            assert g.dtype == dtype, name
            assert torch.equal(g, value), f"rank {rank}: {name} differs from the plain build"
