"""Parameter groups and optimizer as RWKV-LM trains each generation.

RWKV-LM's `configure_optimizers` sorts parameters into learning-rate groups (1x, 2x, 3x) and a
weight-decay group; which parameter goes where is the architecture's rule (`lr_scale`, `decays` in
train/models/). Its trainer then sets each group's lr to `lr * my_lr_scale` at every step
(`src/trainer.py`); `apply_lr` does the same. Adam: DeepSpeed's FusedAdam (GPU) or DeepSpeedCPUAdam
(offload).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.models import architecture

LR_SCALE_KEY = "my_lr_scale"  # the key RWKV-LM uses; DeepSpeed keeps extra param-group keys


def param_groups(model: nn.Module, weight_decay: float, layerwise_lr: bool) -> list[dict[str, Any]]:
    """Named groups: lr_1x, lr_2x, lr_3x, decay (when weight_decay > 0), as the model's architecture
    places each parameter (its module's ``lr_scale`` and ``decays``; see train/models/)."""
    arch = architecture(model.cfg.arch)
    names: dict[str, list[str]] = {"lr_1x": [], "lr_2x": [], "lr_3x": [], "decay": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = arch.lr_scale(n, layerwise_lr)
        if scale != 1.0:
            names[f"lr_{scale:g}x"].append(n)
        elif weight_decay > 0 and arch.decays(n, _matrix_dims(p)):
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
