"""Worker for tests/test_zero_init.py (run by torchrun): build RWKV under deepspeed.zero.Init, then
gather every parameter and save what each rank holds, plus the size of its own partition."""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch

from train.config import ModelConfig
from train.model import RWKV


def main(out: str, precision: str, seed: int, preset: str, overrides: dict) -> None:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank = deepspeed.comm.get_rank()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "bf16": {"enabled": precision == "bf16"}}
    cfg = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = RWKV(cfg)
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    placeholders = all(p.numel() == 0 for p in model.parameters())
    full = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.detach().clone()
    torch.save({"params": full, "local_numel": local, "placeholders": placeholders}, f"{out}.rank{rank}.pt")
    deepspeed.comm.barrier()
    sys.stdout.flush()
    # ZeRO-3 with gloo on CPU can abort in interpreter teardown ("terminate called without an active
    # exception") after all work is done and saved; skip the teardown.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
