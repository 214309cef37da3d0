"""RWKV-6 "Finch" (x060) language model, as BlinkDL's RWKV-LM `RWKV-v5/src/model.py` defines it
(RWKV_Tmix_x060 / RWKV_CMix_x060). RWKV-5 (`train.models.rwkv5`) with a data-dependent token shift and
decay: the block, the model, the state (`rwkv5.State`) and the two modes are RWKV-5's.

Parameter names and shapes are RWKV-LM's (the `rwkv` package detects v6.0 from `time_maa`). With
xx = shift(x) - x, C = n_embd, A = dim_att, D = dim_mix_lora, E = dim_decay_lora:

    xxx = x + xx * time_maa_x
    m_w, m_k, m_v, m_r, m_g = tanh(xxx @ time_maa_w1).view(5, D) @ time_maa_w2   (w1: C x 5D, w2: 5 x D x C)
    x_* = x + xx * (time_maa_* + m_*)                  for * in w, k, v, r, g
    r = receptance(x_r);  k = key(x_k);  v = value(x_v);  g = silu(gate(x_g))
    w = time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2      (w1: C x E, w2: E x A)
    y = WKV6(r, w, k, v, u = time_faaaa)              (train.wkv6; decay exp(-exp(w)) per token)
    out = output(ln_x(y) * g)                         (ln_x: GroupNorm(H), eps 64e-5)

Channel mixing: out = sigmoid(receptance(x + xx * time_maa_r)) * value(relu(key(x + xx * time_maa_k))^2).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from train.config import ModelConfig
from train.models import rwkv5
from train.models.rwkv5 import (  # noqa: F401  (the pipeline asks every arch module for these)
    ADAM_EPS,
    State,
    decays,
    layer_ratios,
    lr_scale,
    wkv_scratch_bytes,
)

ATT_MAA = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g")
FFN_MAA = ("time_maa_k", "time_maa_r")


class TimeMix(rwkv5.TimeMix):
    """RWKV-LM's RWKV_Tmix_x060 (see the module docstring for the formulas)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.layer_id = layer_id
        C, A, N = cfg.n_embd, cfg.dim_att, cfg.head_size
        self.n_head, self.head_size = A // N, N
        D, E = cfg.dim_mix_lora, cfg.dim_decay_lora
        # RWKV-LM's order of definition (named_parameters order: the init seeds follow it)
        for name in ATT_MAA:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, D, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, E))
        self.time_decay_w2 = nn.Parameter(torch.empty(E, A))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_head, N))
        self._projections(cfg)

    def rkvgw(self, x: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, C = x.shape
        xx = xx - x
        xxx = torch.addcmul(x, xx, self.time_maa_x)
        xxx = torch.tanh(xxx @ self.time_maa_w1).view(B, T, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", xxx, self.time_maa_w2).unbind(0)
        xw = torch.addcmul(x, xx, self.time_maa_w + mw)
        xk = torch.addcmul(x, xx, self.time_maa_k + mk)
        xv = torch.addcmul(x, xx, self.time_maa_v + mv)
        xr = torch.addcmul(x, xx, self.time_maa_r + mr)
        xg = torch.addcmul(x, xx, self.time_maa_g + mg)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = torch.nn.functional.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        return r, k, v, g, w.to(r.dtype)


class ChannelMix(rwkv5.ChannelMix):
    """RWKV-LM's RWKV_CMix_x060: sigmoid(receptance(x_r)) * value(relu(key(x_k))^2), x_* = x + xx * maa."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        nn.Module.__init__(self)
        self.layer_id = layer_id
        for name in FFN_MAA:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, cfg.n_embd)))
        self._projections(cfg)

    def mixes(self, x: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xx = xx - x
        return torch.addcmul(x, xx, self.time_maa_k), torch.addcmul(x, xx, self.time_maa_r)


class Block(rwkv5.Block):
    TimeMix = TimeMix
    ChannelMix = ChannelMix


class Model(rwkv5.Model):
    """RWKV-6 language model (see `rwkv5.Model` for the modes)."""

    Block = Block
    TITLE = "RWKV-6"

    def _init_value(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        """RWKV-LM v6 initialisation: RWKV_Tmix_x060 / RWKV_CMix_x060.__init__ for the time_* tensors,
        then generate_init_weight for the rest (as RWKV-5, see `rwkv5.Model._init_value`). With
        ratio_0_to_1 = l / (L - 1), ratio_1_to_almost0 = 1 - l / L, ddd[i] = i / C:

          att.time_maa_x = time_maa_w = time_maa_k = 1 - ddd ** ratio_1_to_almost0
          att.time_maa_v = 1 - (ddd ** ratio_1_to_almost0 + 0.3 ratio_0_to_1)
          att.time_maa_r = time_maa_g = 1 - ddd ** (0.5 ratio_1_to_almost0)
          att.time_maa_w1, time_decay_w1 = 0;  att.time_maa_w2, time_decay_w2: uniform in [-0.01, 0.01]
          att.time_decay, att.time_faaaa: as RWKV-5 (time_decay shaped 1 x 1 x A)
          ffn.time_maa_k = ffn.time_maa_r = 1 - ddd ** (ratio_1_to_almost0 ** 3)
          ln_x, LayerNorms, emb, head and the projections: as RWKV-5.
        """
        return super()._init_value(name, p, seed)

    def _init_time_param(
        self, kind: str, param: str, layer_id: int, p: torch.Tensor, seed: int
    ) -> torch.Tensor:
        if param.endswith("_w1"):
            return p.new_zeros(p.shape, dtype=torch.float32)
        if param.endswith("_w2"):
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed)
            out = p.new_zeros(p.shape, dtype=torch.float32)
            return nn.init.uniform_(out, a=-0.01, b=0.01, generator=gen)
        return torch.from_numpy(init_vector_x060(kind, param, layer_id, self.cfg).astype(np.float32))


def init_vector_x060(kind: str, param: str, layer_id: int, cfg: ModelConfig) -> np.ndarray:
    """RWKV-LM x060's per-channel vectors in float64 (see Model._init_value)."""
    ratio_0_to_1, ratio_1_to_almost0 = layer_ratios(layer_id, cfg.n_layer)
    ddd = np.arange(cfg.n_embd, dtype=np.float64) / cfg.n_embd
    if kind == "ffn":
        return 1.0 - np.power(ddd, ratio_1_to_almost0**3)
    if param in ("time_maa_x", "time_maa_w", "time_maa_k"):
        return 1.0 - np.power(ddd, ratio_1_to_almost0)
    if param == "time_maa_v":
        return 1.0 - (np.power(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
    if param in ("time_maa_r", "time_maa_g"):
        return 1.0 - np.power(ddd, 0.5 * ratio_1_to_almost0)
    decay, bonus = rwkv5.decay_and_bonus(layer_id, cfg)
    if param == "time_decay":
        return decay
    if param == "time_faaaa":
        return bonus
    raise KeyError(f"no initial vector for {kind}.{param}")


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, int | str]:
    """The ModelConfig shape fields of an RWKV-6 state dict in RWKV-LM names (a released .pth, ours)."""
    return config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int | str]:
    """`config_from_state_dict` from the tensors' shapes alone; the LoRA widths from time_maa_w2
    (5 x D x C) and time_decay_w1 (C x E)."""
    if "blocks.0.att.time_maa_w2" not in shapes:
        raise KeyError("not an RWKV-6 (x060) state dict: no blocks.0.att.time_maa_w2")
    return {
        **rwkv5.common_shapes(shapes, "rwkv6"),
        "dim_mix_lora": int(shapes["blocks.0.att.time_maa_w2"][1]),
        "dim_decay_lora": int(shapes["blocks.0.att.time_decay_w1"][1]),
    }


# ------------------------------------------------------------------------------- what the pipeline asks


def _lora_params(cfg: ModelConfig) -> int:
    """Per layer: time_maa_w1 (C x 5D) and w2 (5 x D x C), time_decay_w1 (C x E) and w2 (E x A)."""
    C, A, D, E = cfg.n_embd, cfg.dim_att, cfg.dim_mix_lora, cfg.dim_decay_lora
    return 10 * C * D + C * E + E * A


def n_params(cfg: ModelConfig) -> int:
    """Parameter count: RWKV-5's (`rwkv5.n_params`) plus per layer the LoRA factors (`_lora_params`) and
    two more vectors (time_maa_x, time_maa_w: 2C)."""
    return rwkv5.n_params(cfg) + cfg.n_layer * (_lora_params(cfg) + 2 * cfg.n_embd)


def matmul_params(cfg: ModelConfig) -> int:
    """RWKV-5's projections and head plus the LoRA factors."""
    return rwkv5.matmul_params(cfg) + cfg.n_layer * _lora_params(cfg)


def activation_values_per_layer(cfg: ModelConfig) -> int:
    """RWKV-5's (`rwkv5.activation_values_per_layer`) plus the data-dependent shift and decay: x - xx,
    time_maa_x's mix, the LoRA hidden (tanh in/out), the five offsets, the decay LoRA: 6 n_embd more
    (measured with saved-tensor hooks, tests/test_estimate.py)."""
    return rwkv5.activation_values_per_layer(cfg) + 6 * cfg.n_embd


def wkv_flops_per_token(cfg: ModelConfig) -> float:
    """As RWKV-5 (the same WKV-6 op)."""
    return rwkv5.wkv_flops_per_token(cfg)
