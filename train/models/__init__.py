"""One module per RWKV generation. Each defines the model class and what the rest of the pipeline asks
of an architecture (see `Architecture`); the trainer, converter and generator look it up by name
instead of branching on it."""

from __future__ import annotations

import importlib
from types import ModuleType

# arch name (ModelConfig.arch) -> the module that defines it
ARCH_MODULES = {
    "rwkv4": "train.models.rwkv4",
    "rwkv5": "train.models.rwkv5",
    "rwkv6": "train.models.rwkv6",
    "rwkv7": "train.models.rwkv7",
    "rrwkv": "train.models.rrwkv",
}
# How the docs and logs name each architecture.
ARCH_TITLES = {"rwkv4": "RWKV-4", "rwkv5": "RWKV-5", "rwkv6": "RWKV-6", "rwkv7": "RWKV-7", "rrwkv": "RRWKV"}
# A tensor name only that generation's state dicts have (RWKV-LM's names); RWKV-4 is the default.
# RWKV-5 (x052) alone has time_mix_g (RWKV-4's time mixing has no gate), RWKV-6 (x060) alone time_maa_w1.
SIGNATURE_KEYS = {
    "rwkv5": "blocks.0.att.time_mix_g",
    "rwkv6": "blocks.0.att.time_maa_w1",
    "rwkv7": "blocks.0.att.w0",
    "rrwkv": "blocks.0.att.medium_decay",
}


def architecture(arch: str) -> ModuleType:
    """The module of architecture `arch`. It defines:

    - ``Model``: the nn.Module (a subclass of ``train.model.RWKV``);
    - ``n_params(cfg)``, ``matmul_params(cfg)``, ``wkv_flops_per_token(cfg)``: counts for estimates and MFU;
    - ``lr_scale(name, layerwise_lr)``, ``decays(name, matrix_dims)``, ``ADAM_EPS``: its optimizer;
    - ``activation_values_per_layer(cfg)``, ``wkv_scratch_bytes(cfg, ctx_len, micro_batch)``: memory;
    - ``config_from_shapes(shapes)``: ModelConfig fields read back from a state dict's tensor shapes.
    """
    if arch not in ARCH_MODULES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_MODULES)}")
    return importlib.import_module(ARCH_MODULES[arch])


def arch_of_state_dict(names) -> str:
    """The architecture whose weights these tensor names are (RWKV-4 when none claims them: the
    layout older checkpoints have)."""
    names = set(names)
    return next((arch for arch, key in SIGNATURE_KEYS.items() if key in names), "rwkv4")
