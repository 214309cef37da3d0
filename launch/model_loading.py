"""Build our `RWKV` model from any weights the pipeline produces.

Accepted: a DeepSpeed checkpoint directory, a state dict / RWKV ``.pth`` file, or
a Hugging Face directory written by ``launch.convert --to hf``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.checkpoint_io import CheckpointError, LoadedWeights, load_weights
from launch.hf_format import from_hf_key
from train.config import ModelConfig
from train.model import RWKV

# Written next to converted weights: the model config and the tokenizer they were trained with.
SIDECAR_NAME_HF = "rwkv_pretrain.json"


@dataclass
class LoadedModel:
    model: RWKV
    run_config: dict[str, Any]
    source: str
    base_dir: Path | None = None


def model_config_from(loaded: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelConfig:
    """ModelConfig from a recorded/inferred dict, ignoring fields this version does not know."""
    known = {f for f in ModelConfig.__dataclass_fields__}
    values = {k: v for k, v in loaded.items() if k in known}
    values.update(overrides or {})
    return ModelConfig.from_dict(values)


def model_from_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, origin: str) -> RWKV:
    """An fp32 `RWKV` holding exactly these tensors (built on the meta device: no wasted init)."""
    with torch.device("meta"):
        model = RWKV(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: weights do not match the model config {cfg.n_layer} layers x {cfg.n_embd}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fp32 = {k: v.contiguous().to(torch.float32) for k, v in tensors.items()}
    model.load_state_dict(fp32, assign=True)
    return model.eval()


def load_hf_dir(path: Path) -> LoadedWeights:
    """A directory written by ``launch.convert --to hf`` (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    st = path / "model.safetensors"
    cfg_file = path / "config.json"
    for f in (st, cfg_file):
        if not f.is_file():
            raise CheckpointError(f"{path}: not a Hugging Face model directory ({f.name} missing)")
    try:
        hf = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types for damaged headers/truncation
        raise CheckpointError(f"{st}: cannot be read ({type(e).__name__}: {e})") from e
    tensors = {from_hf_key(k): v for k, v in hf.items()}
    hf_cfg = json.loads(cfg_file.read_text())
    sidecar = path / SIDECAR_NAME_HF
    run_config = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    model_cfg = dict(run_config.get("model") or {})
    model_cfg.update(
        n_layer=hf_cfg["num_hidden_layers"],
        n_embd=hf_cfg["hidden_size"],
        vocab_size=hf_cfg["vocab_size"],
        dim_ffn=hf_cfg.get("intermediate_size") or 4 * hf_cfg["hidden_size"],
        ctx_len=hf_cfg.get("context_length", model_cfg.get("ctx_len", 1024)),
        layer_norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
    )
    return LoadedWeights(tensors, model_cfg, run_config, f"Hugging Face directory {path}", base_dir=path)


def load_any_weights(
    path: str | Path, tag: str | None = None, model_config_path: str | Path | None = None
) -> LoadedWeights:
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return load_hf_dir(path)
    return load_weights(path, tag=tag, model_config_path=model_config_path)


def load_model(
    path: str | Path,
    tag: str | None = None,
    model_config_path: str | Path | None = None,
    wkv_backend: str | None = None,
) -> LoadedModel:
    """Our fp32 model from any supported weights; `wkv_backend` overrides the recorded one."""
    loaded = load_any_weights(path, tag, model_config_path)
    overrides = {"wkv_backend": wkv_backend} if wkv_backend else {}
    cfg = model_config_from(loaded.model_config or {}, overrides)
    model = model_from_tensors(loaded.tensors, cfg, loaded.source)
    return LoadedModel(model, loaded.run_config or {}, loaded.source, loaded.base_dir)
