"""Parameter groups and optimizer as RWKV-LM v4neo trains RWKV-4.

RWKV-LM (`RWKV-v4neo/src/model.py`, `RWKV.configure_optimizers`) with `layerwise_lr > 0` and
`my_pile_stage != 2` puts `time_decay` in a 2x learning-rate group and `time_first` in a 3x group
(`time_mix_*` stay at 1x); with `weight_decay > 0` the remaining parameters whose squeezed shape has
two or more dimensions (the matrices) get weight decay, everything else none. Its trainer then sets
each group's lr to `lr * my_lr_scale` at every step (`src/trainer.py`); `apply_lr` does the same.
Adam: betas (0.9, 0.99), eps 1e-8; DeepSpeed's FusedAdam (GPU) or DeepSpeedCPUAdam (offload).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LR_SCALE_KEY = "my_lr_scale"  # the key RWKV-LM uses; DeepSpeed keeps extra param-group keys


def param_groups(model: nn.Module, weight_decay: float, layerwise_lr: bool) -> list[dict[str, Any]]:
    """Named groups: lr_1x, lr_2x (time_decay), lr_3x (time_first), decay (matrices, when enabled)."""
    names: dict[str, list[str]] = {"lr_1x": [], "lr_2x": [], "lr_3x": [], "decay": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if layerwise_lr and "time_decay" in n:
            names["lr_2x"].append(n)
        elif layerwise_lr and "time_first" in n:
            names["lr_3x"].append(n)
        elif weight_decay > 0 and _matrix_dims(p) >= 2:
            names["decay"].append(n)
        else:
            names["lr_1x"].append(n)
    params = dict(model.named_parameters())
    scales = {"lr_1x": 1.0, "lr_2x": 2.0, "lr_3x": 3.0, "decay": 1.0}
    groups = []
    for key in ("lr_1x", "lr_2x", "lr_3x", "decay"):
        if not names[key]:
            continue
        groups.append(
            {
                "params": [params[n] for n in sorted(names[key])],
                "weight_decay": weight_decay if key == "decay" else 0.0,
                LR_SCALE_KEY: scales[key],
                "name": key,
            }
        )
    return groups


def _matrix_dims(p: torch.Tensor) -> int:
    """Dimensions of size > 1 (RWKV-LM's len(p.squeeze().shape)); a ZeRO-3 partitioned parameter
    is an empty placeholder whose real shape is p.ds_shape."""
    return sum(1 for d in getattr(p, "ds_shape", p.shape) if d != 1)


def torch_adamw(
    groups: list[dict[str, Any]], lr: float, betas: list[float], eps: float
) -> torch.optim.Optimizer:
    """torch.optim.AdamW over the groups (no C++ op to build; used by tests and small runs)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(betas[0], betas[1]), eps=eps, foreach=False)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr * its multiplier (DeepSpeed ZeRO optimizers expose param_groups)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get(LR_SCALE_KEY, 1.0)
