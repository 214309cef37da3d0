"""Hugging Face formats, one module per architecture: RWKV-4 as transformers' ``RwkvForCausalLM``
(`launch.hf_format_rwkv4`), RWKV-7 in the flash-linear-attention layout of the hub's RWKV-7 models
(`launch.hf_format_rwkv7`). Each module offers:

- ``hf_tensor(name, t) -> (hf_name, tensor) | None``: one of our tensors as the HF model holds it;
- ``our_tensors(hf_tensors) -> dict``: the inverse (unknown names kept, to be reported);
- ``hf_config(model_config, shapes, eos_id) -> dict``: its config.json;
- ``model_config_from_hf(hf_cfg, shapes) -> dict``: our ModelConfig fields back;
- ``load_hf_model(path)``: the directory loaded by the package that consumes it (for --verify);
- ``MODEL_TYPE`` (config.json's model_type) and ``VERIFIER_PACKAGE``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

HF_FORMAT_MODULES = {"rwkv4": "launch.hf_format_rwkv4", "rwkv7": "launch.hf_format_rwkv7"}
# Architectures without a Hugging Face format here, and what to use instead.
NO_HF_FORMAT = {
    "rwkv5": "RWKV-5 (x052) has no Hugging Face format in this pipeline; convert with --to rwkv (a .pth for "
    "the rwkv package) or --to fp32",
    "rwkv6": "RWKV-6 (x060) has no Hugging Face format in this pipeline; convert with --to rwkv (a .pth for "
    "the rwkv package) or --to fp32",
    "rrwkv": "RRWKV has no Hugging Face model (transformers has none, and RWKV-4's would drop the mediums): "
    "convert with --to rwkv (our .pth layout + .json) or --to fp32",
}
# Architectures the `rwkv` package has no code for: `--to rwkv` writes this pipeline's own key layout
# (plus the .json sidecar), read back by launch.model_loading (generate, score), and --verify runs that
# reader instead of the package.
OWN_LAYOUT_ONLY = {"rrwkv": "RRWKV"}


def hf_format(arch: str) -> ModuleType:
    """The HF format module of architecture `arch`."""
    if arch in NO_HF_FORMAT:
        raise ValueError(NO_HF_FORMAT[arch])
    if arch not in HF_FORMAT_MODULES:
        raise ValueError(f"no Hugging Face format for architecture {arch!r}")
    return importlib.import_module(HF_FORMAT_MODULES[arch])


def arch_of_hf_config(hf_cfg: dict[str, Any]) -> str:
    """Our architecture name for a config.json, by its model_type."""
    model_type = hf_cfg.get("model_type")
    for arch in HF_FORMAT_MODULES:
        if hf_format(arch).MODEL_TYPE == model_type:
            return arch
    known = ", ".join(hf_format(a).MODEL_TYPE for a in HF_FORMAT_MODULES)
    raise ValueError(f"model_type {model_type!r} is not one this pipeline converts ({known})")
