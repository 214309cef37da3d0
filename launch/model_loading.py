"""Build our `RWKV` model from any weights the pipeline produces.

Accepted: a DeepSpeed checkpoint directory, a state dict / RWKV ``.pth`` file, or
a Hugging Face directory written by ``launch.convert --to hf``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.checkpoint_io import CheckpointError, LoadedWeights, load_weights
from launch.hf_format import arch_of_hf_config, hf_format
from train.config import ModelConfig
from train.model import RWKV
from train.models import ARCH_TITLES

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
    try:
        return ModelConfig.from_dict(values)
    except (ValueError, TypeError) as e:  # e.g. tensor shapes no RWKV can have (dim_att != n_embd)
        raise CheckpointError(f"not a usable RWKV model config: {e}") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture has, by name, with its shape (the model itself built on meta)."""
    with torch.device("meta"):
        model = RWKV(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(items: list[str], limit: int = 40) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_tensors_match(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, origin: str) -> None:
    """Refuse weights that lack a tensor of any layer, have one of the wrong shape, or carry extras."""
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    misshapen = [f"{k} {tuple(shapes[k])} (expected {v})" for k, v in expected.items()
                 if k in shapes and tuple(shapes[k]) != v]
    unexpected = [k for k in shapes if k not in expected]
    problems = [f"{what} {len(items)}: {_listing(items)}" for what, items in
                (("missing", missing), ("misshapen", misshapen), ("unexpected", unexpected)) if items]
    if problems:
        raise CheckpointError(
            f"{origin}: weights do not match {ARCH_TITLES[cfg.arch]} {cfg.n_layer} layers x {cfg.n_embd}, "
            f"vocab {cfg.vocab_size} ({len(expected)} tensors): " + "; ".join(problems)
        )


def model_from_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, origin: str) -> RWKV:
    """An fp32 `RWKV` holding exactly these tensors (built on the meta device: no wasted init)."""
    check_tensors_match({k: tuple(v.shape) for k, v in tensors.items()}, cfg, origin)
    with torch.device("meta"):
        model = RWKV(cfg)
    fp32 = {k: v.contiguous().to(torch.float32) for k, v in tensors.items()}
    model.load_state_dict(fp32, assign=True)
    return model.eval()


def load_hf_dir(path: Path) -> LoadedWeights:
    """A directory written by ``launch.convert --to hf`` (config.json + model.safetensors), of any
    architecture (config.json's model_type says which)."""
    from safetensors.torch import load_file

    st = path / "model.safetensors"
    cfg_file = path / "config.json"
    for f in (st, cfg_file):
        if not f.is_file():
            raise CheckpointError(f"{path}: not a Hugging Face model directory ({f.name} missing)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
        fmt = hf_format(arch_of_hf_config(hf_cfg))
    except (ValueError, AttributeError) as e:  # JSON errors are ValueErrors
        raise CheckpointError(f"{cfg_file}: not an RWKV config.json ({type(e).__name__}: {e})") from None
    try:
        hf = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types for damaged headers/truncation
        raise CheckpointError(f"{st}: cannot be read ({type(e).__name__}: {e})") from e
    try:
        tensors = fmt.our_tensors(hf)
        sidecar = path / SIDECAR_NAME_HF
        run_config = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        model_cfg = dict(run_config.get("model") or {})
        model_cfg.update(fmt.model_config_from_hf(hf_cfg, {k: tuple(v.shape) for k, v in tensors.items()}))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: not a usable RWKV model directory ({type(e).__name__}: {e})") \
            from None
    return LoadedWeights(tensors, model_cfg, run_config, f"Hugging Face directory {path}", base_dir=path)


def load_any_weights(
    path: str | Path, tag: str | None = None, model_config_path: str | Path | None = None
) -> LoadedWeights:
    """Weights from any supported source, checked tensor by tensor against the architecture."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        loaded = load_hf_dir(path)
    else:
        loaded = load_weights(path, tag=tag, model_config_path=model_config_path)
    try:
        cfg = model_config_from(loaded.model_config or {})
    except CheckpointError as e:
        raise CheckpointError(f"{loaded.source}: {e}") from None
    check_tensors_match(loaded.shapes(), cfg, loaded.source)
    return loaded


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
