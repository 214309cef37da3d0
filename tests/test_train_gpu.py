"""The trainer on CUDA: nccl, bf16, DeepSpeed's FusedAdam and the CUDA WKV kernel (skipped without a GPU).

Also the GPU plumbing a CPU twin cannot show: every collective on CUDA tensors (NCCL refuses host
ones), and a step with a NaN inside the forward pass skipped under NCCL and FusedAdam."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (trains with nccl)"),
]


def test_zero2_bf16_fused_adam_on_gpus(demo_shards, tmp_path):
    from torch.utils.cpp_extension import CUDA_HOME

    # The WKV kernel and FusedAdam are compiled on first use (nvcc), and bf16 needs a GPU that has it
    # (Ampere or newer): asked of torch, the answer DeepSpeed's CUDA accelerator gives as well.
    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (nvcc) to build the WKV kernel and FusedAdam")
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16")
    nproc = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "gpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone",  # the store binds a free port itself: no port race
           "-m", "train", "--config", str(REPO / "configs" / "tiny.yaml")]
    for o in (f"data.manifests=[{demo_shards}]", f"run_dir={run_dir}", "train.steps=30",
              "train.precision=bf16", "train.zero_stage=2", "optim.name=adam", "model.wkv_backend=cuda",
              "log.progress=false", "train.fault_nan_steps=[5]",
              "checkpoint.every=0", "eval.every=10"):
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [s for s in range(1, 31) if s != 5]
    assert [r["step"] for r in recs if "skipped_nonfinite" in r] == [5]
    assert "non-finite loss at step 5" in out.stdout
    assert sum(r["loss"] for r in train[-5:]) / 5 < train[0]["loss"] - 1.0
    assert all(r["gpu_mem_gib"] > 0 for r in train)
    assert len([r for r in recs if "val_loss" in r]) == 3  # steps 10, 20 and the end
