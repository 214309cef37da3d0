"""Our RWKV-4 parameter names <-> Hugging Face ``RwkvForCausalLM`` names, and its config.json.

The per-architecture interface `launch.hf_format` dispatches to: `hf_tensor`, `our_tensors`,
`hf_config`, `model_config_from_hf`, `load_hf_model`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Suffix renames inside one block; the block index is carried over unchanged.
_BLOCK_RENAMES = {
    "ln0.": "pre_ln.",  # exists in block 0 only
    "ln1.": "ln1.",
    "ln2.": "ln2.",
    "att.key.": "attention.key.",
    "att.value.": "attention.value.",
    "att.receptance.": "attention.receptance.",
    "att.output.": "attention.output.",
    "att.time_decay": "attention.time_decay",
    "att.time_first": "attention.time_first",
    "att.time_mix_k": "attention.time_mix_key",
    "att.time_mix_v": "attention.time_mix_value",
    "att.time_mix_r": "attention.time_mix_receptance",
    "ffn.key.": "feed_forward.key.",
    "ffn.value.": "feed_forward.value.",
    "ffn.receptance.": "feed_forward.receptance.",
    "ffn.time_mix_k": "feed_forward.time_mix_key",
    "ffn.time_mix_r": "feed_forward.time_mix_receptance",
}


def to_hf_key(name: str) -> str:
    """Map one of our parameter names to the transformers RWKV name."""
    if name.startswith("emb."):
        return "rwkv.embeddings." + name[len("emb.") :]
    if name.startswith("ln_out."):
        return "rwkv." + name
    if name == "head.weight":
        return name
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        layer, rest = m.groups()
        for ours, theirs in _BLOCK_RENAMES.items():
            if rest.startswith(ours):
                return f"rwkv.blocks.{layer}.{theirs}{rest[len(ours) :]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def hf_config(
    model_config: dict[str, Any], shapes: dict[str, tuple[int, ...]], eos_id: int = 0
) -> dict[str, Any]:
    """config.json for ``RwkvForCausalLM``, sized from the tensors themselves.

    ``rescale_every`` is 0: transformers' default (6) halves the hidden state every
    6 blocks at inference and divides the matching output weights to compensate,
    which is only exact when the weights were trained for it and loses precision
    in fp16/bf16 otherwise; our models are trained without it.
    """
    vocab_size, hidden = shapes["emb.weight"]
    n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": n_layer,
        "attention_hidden_size": shapes["blocks.0.att.key.weight"][0],
        "intermediate_size": shapes["blocks.0.ffn.key.weight"][0],
        "context_length": int(model_config.get("ctx_len", 1024)),
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 0,
        "tie_word_embeddings": False,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }


def from_hf_key(name: str) -> str:
    """Map a transformers RWKV parameter name back to ours (inverse of `to_hf_key`)."""
    if name.startswith("rwkv.embeddings."):
        return "emb." + name[len("rwkv.embeddings.") :]
    if name.startswith("rwkv.ln_out."):
        return name[len("rwkv.") :]
    if name == "head.weight":
        return name
    m = re.fullmatch(r"rwkv\.blocks\.(\d+)\.(.+)", name)
    if m:
        layer, rest = m.groups()
        for ours, theirs in _BLOCK_RENAMES.items():
            # vector names match whole; module names (ending in '.') match as prefixes of '.weight'/'.bias'
            if rest == theirs or (theirs.endswith(".") and rest.startswith(theirs)):
                return f"blocks.{layer}.{ours}{rest[len(theirs) :]}"
    raise KeyError(f"no RWKV-LM name for Hugging Face parameter {name!r}")


# ------------------------------------------------------------------ the interface launch.hf_format uses
MODEL_TYPE = "rwkv"
VERIFIER_PACKAGE = "transformers"


def hf_tensor(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One of our tensors as the HF model holds it: its name there, the same values."""
    return to_hf_key(name), t


def our_tensors(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors under our names; an unknown one keeps its own name, to be reported as unexpected."""
    out = {}
    for k, v in hf_tensors.items():
        try:
            out[from_hf_key(k)] = v
        except KeyError:
            out[k] = v
    return out


def model_config_from_hf(hf_cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Our ModelConfig fields from a config.json (shapes: the tensors under our names)."""
    del shapes
    return {
        "arch": "rwkv4",
        "n_layer": hf_cfg["num_hidden_layers"],
        "n_embd": hf_cfg["hidden_size"],
        "vocab_size": hf_cfg["vocab_size"],
        "dim_ffn": hf_cfg.get("intermediate_size") or 4 * hf_cfg["hidden_size"],
        "ctx_len": hf_cfg.get("context_length", 1024),
        "layer_norm_eps": hf_cfg.get("layer_norm_epsilon", 1e-5),
    }


def load_hf_model(path: Path) -> torch.nn.Module:
    """The directory in transformers' RwkvForCausalLM, fp32, eval mode: `model(idx).logits`."""
    from transformers import RwkvForCausalLM

    return RwkvForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
