"""Fill DeepSpeed's `"auto"` fields from the run config and refuse contradictions.

The run config is the single source of truth for batch sizes, precision, ZeRO stage, clipping and
the optimizer hyper-parameters; `ds_config.json` carries everything else (bucket sizes, fp16 loss
scaling, offload details). A value written explicitly in `ds_config.json` must agree with the run
config, otherwise the run stops before any process group starts. ZeRO 1/2 bucket sizes written as
"auto" are sized from the model's width (zero12_bucket_size); numbers written there are kept.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from train.run_config import ConfigError, RunConfig

AUTO = "auto"


def load_ds_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object")
    return data


def _fill(node: dict[str, Any], key: str, value: Any, where: str, origin: str) -> None:
    """node[key] = value if it is absent or "auto"; otherwise it must already equal value."""
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
        return
    same = current == value
    if isinstance(value, float) and isinstance(current, (int, float)):
        same = abs(float(current) - value) <= 1e-12 * max(1.0, abs(value))
    if isinstance(value, list) and isinstance(current, list):
        same = [float(x) for x in current] == [float(x) for x in value]
    if not same:
        raise ConfigError(
            f"{origin}: {where} is {current!r} but the run config implies {value!r}; "
            f'set it to "auto" in the DeepSpeed config or change the run config'
        )


def fill_ds_config(
    ds: dict[str, Any], cfg: RunConfig, world_size: int, origin: str = "ds_config.json"
) -> dict[str, Any]:
    """A copy of `ds` with every "auto" resolved for this run at this world size."""
    ds = copy.deepcopy(ds)
    t, o = cfg.train, cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train_micro_batch_size_per_gpu", origin)
    # Each segment of a window is one DeepSpeed micro-step (train/segments.py): the engine divides every
    # segment's loss by grad_accum x segments and steps once per grad_accum windows.
    gas = t.grad_accum * t.n_segments
    _fill(ds, "gradient_accumulation_steps", gas, "gradient_accumulation_steps", origin)
    _fill(ds, "train_batch_size", t.micro_batch_size * gas * world_size, "train_batch_size", origin)
    _fill(ds, "gradient_clipping", float(t.grad_clip), "gradient_clipping", origin)

    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        _fill(section, "enabled", t.precision == name, f"{name}.enabled", origin)

    zero = ds.setdefault("zero_optimization", {})
    _fill(zero, "stage", t.zero_stage, "zero_optimization.stage", origin)
    offload = zero.get("offload_optimizer")
    if isinstance(offload, dict):
        _fill(offload, "device", "cpu" if t.offload_optimizer else "none", "offload_optimizer.device", origin)
        if offload["device"] == "none":
            zero.pop("offload_optimizer")
    elif t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.zero_stage == 0:
        zero.pop("offload_optimizer", None)
    # overlap_comm "auto": on with more than one process. DeepSpeed's overlap path synchronises the
    # whole device before each bucket's reduction; with one process there is nothing to overlap, and on
    # one H200 the 169m trainer ran at ~57k tokens/s with it against ~100k without (docs/gpu.md).
    if zero.get("overlap_comm") == AUTO:
        zero["overlap_comm"] = world_size > 1
    width = _model_width(cfg)
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key) == AUTO:  # a number written in ds_config.json is a tuning choice: it wins
            zero[key] = zero12_bucket_size(width)

    if o.name == "adam":
        opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(o.lr_init), "optimizer.params.lr", origin)
        _fill(params, "betas", [float(b) for b in o.betas], "optimizer.params.betas", origin)
        _fill(params, "eps", adam_eps(cfg), "optimizer.params.eps", origin)
        _fill(params, "weight_decay", float(o.weight_decay), "optimizer.params.weight_decay", origin)
    else:
        # torch_adamw: the trainer builds the optimizer itself and passes it to deepspeed.initialize.
        ds.pop("optimizer", None)
        # DeepSpeed refuses a client optimizer with offload unless told it is fine.
        if t.offload_optimizer:
            ds["zero_force_ds_cpu_optimizer"] = False
    if "scheduler" in ds:
        raise ConfigError(
            f"{origin}: has a 'scheduler' section; the trainer sets the LR itself from optim.* "
            "(remove the section)"
        )
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f'{origin}: no run-config value to fill {leftover} (replace "auto" by a value)')
    return ds


# ZeRO-1/2 gradient buckets, in elements. Each reduce-scatter (and, after the step, all-gather of
# the updated parameters) sends one bucket, so the size trades message size against memory:
# - NCCL reaches its bus bandwidth across nodes only with messages of tens of MB or more; HF's
#   "auto" (hidden_size^2) gives 8 MB buckets for 1b5 in bf16 and 30 KB for the tiny model, i.e.
#   hundreds to thousands of latency-bound collectives a step: hence the floor of 5e7 elements
#   (100 MB in bf16), which is the size for every shipped preset (n_embd^2 < 5e7 up to 14b).
# - with overlap_comm, DeepSpeed keeps ~4.5 buckets' worth of buffers in flight (its docs): 5e7
#   bf16 elements cost ~0.9 GB of GPU memory, DeepSpeed's own default 5e8 ~9 GB, which a 7B-14B
#   run does not have to spare; hence the cap. Wider custom models scale as n_embd^2 in between.
BUCKET_FLOOR = 50_000_000
BUCKET_CAP = 500_000_000


def zero12_bucket_size(n_embd: int) -> int:
    """ "auto" reduce/allgather bucket size for ZeRO 1/2: n_embd^2 elements within [5e7, 5e8]."""
    return int(min(max(n_embd * n_embd, BUCKET_FLOOR), BUCKET_CAP))


def adam_eps(cfg: RunConfig) -> float:
    """optim.eps, or when unset the default of the run's architecture (its module's ADAM_EPS)."""
    if cfg.optim.eps is not None:
        return float(cfg.optim.eps)
    from train.config import ModelConfig
    from train.models import architecture

    arch = cfg.model.overrides.get("arch")
    try:
        arch = arch or ModelConfig.from_preset(cfg.model.preset).arch
        return architecture(arch).ADAM_EPS
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.source}: model: {e}") from None


def _model_width(cfg: RunConfig) -> int:
    """n_embd of the run's model: the resolved value train.trainer.plan records, else the preset's."""
    width = cfg.model.overrides.get("n_embd")
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    from train.config import ModelConfig

    try:
        return ModelConfig.from_preset(cfg.model.preset).n_embd
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.source}: model: {e}") from None


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _find_auto(v, f"{prefix}{k}.")
    elif node == AUTO:
        found.append(prefix.rstrip("."))
    return found
