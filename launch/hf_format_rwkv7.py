"""Our RWKV-7 (x070) state dict (RWKV-LM names) <-> the flash-linear-attention Hugging Face layout that
the hub's RWKV-7 models use (`fla-hub/rwkv7-*`, `RWKV7ForCausalLM`), and its config.json.

    emb.weight                     model.embeddings.weight
    blocks.0.ln0.*                 model.layers.0.pre_norm.*
    blocks.N.ln1.* / ln2.*         model.layers.N.attn_norm.* / ffn_norm.*
    blocks.N.att.x_{r,w,k,v,a,g}   model.layers.N.attn.x_{r,w,k,v,a,g}      (1, 1, C) both
    blocks.N.att.{w,a,v,g}1        model.layers.N.attn.{w,a,v,g}_lora.lora.0.weight   transposed: (D, C)
    blocks.N.att.{w,a,v,g}2        model.layers.N.attn.{w,a,v,g}_lora.lora.2.weight   transposed: (C, D)
    blocks.N.att.{w,a,v}0          model.layers.N.attn.{w,a,v}_lora.lora.2.bias       (C,)
    blocks.N.att.k_k / k_a         model.layers.N.attn.k_k / k_a                      (C,)
    blocks.N.att.r_k               model.layers.N.attn.r_k                            (H, N) both
    blocks.N.att.receptance/key/value/output.weight   model.layers.N.attn.{r,k,v,o}_proj.weight
    blocks.N.att.ln_x.*            model.layers.N.attn.g_norm.*
    blocks.N.ffn.x_k               model.layers.N.ffn.x_k                             (C,)
    blocks.N.ffn.key/value.weight  model.layers.N.ffn.key/value.weight
    ln_out.*                       model.norm.*
    head.weight                    lm_head.weight

Layer 0 of the HF model has no v_lora (the value residual starts at layer 1): our blocks.0.att.v0/v1/v2,
which RWKV-LM keeps but never uses, are dropped on the way out and come back as zeros.
Nothing else changes: the HF model computes the decay as exp(-exp(-0.5) sigmoid(w)), which equals our
exp(-exp(-softplus(-w) - 0.5)), and its g_norm eps is head_dim * norm_eps = 64e-5 as our ln_x.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

_ATT_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_BLOCK_LN = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_LORA_PART = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}
# Our vectors stored flat in the HF layout (ours are (1, 1, C) as RWKV-LM's).
_FLAT_VECTORS = {"k_k", "k_a"}
# Names we keep that the HF layout has no place for (unused by the math).
UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def to_hf_key(name: str) -> str | None:
    """The HF name of one of our parameters (None for the unused layer-0 v0/v1/v2)."""
    if name in UNUSED:
        return None
    top = {"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    if name.startswith("ln_out."):
        return "model.norm." + name[len("ln_out.") :]
    m = re.fullmatch(r"blocks\.(\d+)\.(ln0|ln1|ln2|att|ffn)\.(.+)", name)
    if not m:
        raise KeyError(f"no Hugging Face RWKV-7 name for parameter {name!r}")
    layer, part, rest = m.groups()
    prefix = f"model.layers.{layer}."
    if part in _BLOCK_LN:
        return prefix + f"{_BLOCK_LN[part]}.{rest}"
    if part == "ffn":
        return prefix + "ffn." + rest
    lora = re.fullmatch(r"([wavg])([012])", rest)
    if lora:
        return prefix + f"attn.{lora[1]}_lora.{_LORA_PART[lora[2]]}"
    module, _, leaf = rest.partition(".")
    if module in _ATT_PROJ and leaf:
        return prefix + f"attn.{_ATT_PROJ[module]}.{leaf}"
    return prefix + "attn." + rest


def _to_hf_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if re.fullmatch(r"[wavg][12]", leaf):
        return t.t().contiguous()
    if re.fullmatch(r"[wav]0", leaf) or leaf in _FLAT_VECTORS or name.endswith("ffn.x_k"):
        return t.reshape(-1).contiguous()
    return t


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the HF RWKV-7 state dict (same dtypes; LoRA factors transposed, vectors
    reshaped as the HF modules hold them; layer 0's unused v0/v1/v2 left out)."""
    out = {}
    for name, t in sd.items():
        key = to_hf_key(name)
        if key is not None:
            out[key] = _to_hf_tensor(name, t)
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF RWKV-7 state dict -> ours (inverse of `to_hf_state_dict`); layer 0's v0/v1/v2 as zeros of
    the shapes layer 1 has (LoRA width 32 for a one-layer model)."""
    ours = {}
    hf_names = {}
    for name in _our_names(hf_sd):
        hf_names[to_hf_key(name)] = name
    unknown = set(hf_sd) - set(hf_names)
    if unknown:
        raise KeyError(f"unexpected Hugging Face RWKV-7 parameters: {sorted(unknown)[:10]}")
    C = hf_sd["model.embeddings.weight"].shape[1]
    for key, name in hf_names.items():
        t = hf_sd[key]
        leaf = name.rsplit(".", 1)[-1]
        if re.fullmatch(r"[wavg][12]", leaf):
            t = t.t().contiguous()
        elif re.fullmatch(r"[wav]0|x_[rwkvag]|k_k|k_a", leaf) or name.endswith("ffn.x_k"):
            t = t.reshape(1, 1, C)
        ours[name] = t
    dtype = hf_sd["model.embeddings.weight"].dtype
    dv = hf_sd["model.layers.1.attn.v_lora.lora.0.weight"].shape[0] if "blocks.1.att.v1" in ours else 32
    ours["blocks.0.att.v0"] = torch.zeros(1, 1, C, dtype=dtype)
    ours["blocks.0.att.v1"] = torch.zeros(C, dv, dtype=dtype)
    ours["blocks.0.att.v2"] = torch.zeros(dv, C, dtype=dtype)
    return ours


def _our_names(hf_sd: dict[str, torch.Tensor]) -> list[str]:
    """Our parameter names for the layers an HF state dict has (without layer 0's unused v0/v1/v2)."""
    n_layer = 1 + max(int(k.split(".")[2]) for k in hf_sd if k.startswith("model.layers."))
    names = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
    for i in range(n_layer):
        b = f"blocks.{i}."
        names += [b + f"{ln}.{wb}" for ln in ("ln1", "ln2") for wb in ("weight", "bias")]
        names += [b + f"att.x_{c}" for c in "rwkvag"]
        for lora in "wavg":
            names += [b + f"att.{lora}1", b + f"att.{lora}2"] + ([b + f"att.{lora}0"] if lora != "g" else [])
        names += [b + "att.k_k", b + "att.k_a", b + "att.r_k"]
        names += [b + f"att.{m}.weight" for m in ("receptance", "key", "value", "output")]
        names += [b + "att.ln_x.weight", b + "att.ln_x.bias"]
        names += [b + "ffn.x_k", b + "ffn.key.weight", b + "ffn.value.weight"]
    names += ["ln_out.weight", "ln_out.bias", "head.weight"]
    return [n for n in names if n not in UNUSED]


def hf_config(
    model_config: dict[str, Any], shapes: dict[str, tuple[int, ...]], eos_id: int = 0
) -> dict[str, Any]:
    """config.json of the HF RWKV-7 model (`model_type` rwkv7, `RWKV7ForCausalLM`), sized from the
    tensor shapes of OUR state dict (RWKV-LM names). The keys are those the hub's fla-format RWKV-7
    configs and the `rwkv7_hf` reference model read; token ids as the hub's converted models
    (pad 0, bos 1, eos eos_id: 0 is the World tokenizer's end of text)."""
    vocab_size, hidden = shapes["emb.weight"]
    n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    n_head, head_dim = shapes["blocks.0.att.r_k"][-2:]
    attention_hidden = shapes["blocks.0.att.receptance.weight"][0]
    intermediate = shapes["blocks.0.ffn.key.weight"][0]
    v1 = shapes.get("blocks.1.att.v1", shapes.get("blocks.0.att.v1", (hidden, 32)))
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": n_layer,
        "num_heads": n_head,
        "head_dim": head_dim,
        "attention_hidden_size": attention_hidden,
        "value_dim": [attention_hidden] * n_layer,
        "hidden_ratio": intermediate / hidden,
        "intermediate_size": intermediate,
        "hidden_act": "sqrt_relu",
        "decay_low_rank_dim": shapes["blocks.0.att.w1"][1],
        "a_low_rank_dim": shapes["blocks.0.att.a1"][1],
        "v_low_rank_dim": v1[1],
        "gate_low_rank_dim": shapes["blocks.0.att.g1"][1],
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": float(model_config.get("layer_norm_eps", 1e-5)),
        "max_position_embeddings": int(model_config.get("ctx_len", 4096)),
        "attn_mode": "chunk",
        "fuse_norm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": eos_id,
    }


def save_hf_dir(
    sd: dict[str, torch.Tensor], model_config: dict[str, Any], out_dir: str | Path, eos_id: int = 0
) -> Path:
    """Write our state dict as an HF RWKV-7 directory: config.json + model.safetensors (no tokenizer,
    no remote code: load it with `rwkv7_hf.modeling_rwkv7.RWKV7ForCausalLM.from_pretrained(out_dir)`,
    or with fla's RWKV7ForCausalLM)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(model_config, {k: tuple(v.shape) for k, v in sd.items()}, eos_id=eos_id)
    config["torch_dtype"] = str(sd["emb.weight"].dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(sd).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------ the interface launch.hf_format uses
MODEL_TYPE = "rwkv7"
VERIFIER_PACKAGE = "rwkv7_hf"


def hf_tensor(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One of our tensors as the HF model holds it (None for layer 0's unused v0/v1/v2)."""
    key = to_hf_key(name)
    return None if key is None else (key, _to_hf_tensor(name, t))


def our_tensors(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors under our names (`from_hf_state_dict`); unknown ones keep their own names, to be
    reported as unexpected."""
    known = {to_hf_key(n) for n in _our_names(hf_tensors)}
    ours = from_hf_state_dict({k: v for k, v in hf_tensors.items() if k in known})
    ours.update({k: v for k, v in hf_tensors.items() if k not in known})
    return ours


def model_config_from_hf(hf_cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Our ModelConfig fields from a config.json and the tensors' shapes (under our names)."""
    from train.models.rwkv7 import config_from_shapes

    return {
        **config_from_shapes(shapes),
        "ctx_len": hf_cfg.get("max_position_embeddings", 4096),
        "layer_norm_eps": hf_cfg.get("norm_eps", 1e-5),
    }


def load_hf_model(path: Path) -> torch.nn.Module:
    """The directory in the `rwkv7_hf` reference model (a pure-PyTorch RWKV7ForCausalLM), fp32, eval
    mode: `model(idx).logits`."""
    from rwkv7_hf.modeling_rwkv7 import RWKV7ForCausalLM

    return RWKV7ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
