"""One module per RWKV generation. Each defines the model class and what the rest of the pipeline asks
of an architecture (see `Architecture`); the trainer, converter and generator look it up by name
instead of branching on it."""

from __future__ import annotations

import importlib
from types import ModuleType

# arch name (ModelConfig.arch) -> the module that defines it
ARCH_MODULES = {"rwkv4": "train.models.rwkv4", "rwkv7": "train.models.rwkv7"}


def architecture(arch: str) -> ModuleType:
    """The module of architecture `arch`. It defines:

    - ``Model``: the nn.Module (a subclass of ``train.model.RWKV``);
    - ``n_params(cfg)``, ``matmul_params(cfg)``, ``wkv_flops_per_token(cfg)``: counts for estimates and MFU;
    - ``param_group_of(name, p, weight_decay, layerwise_lr)``: the optimizer group of a parameter.
    """
    if arch not in ARCH_MODULES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_MODULES)}")
    return importlib.import_module(ARCH_MODULES[arch])
