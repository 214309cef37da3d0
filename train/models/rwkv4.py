"""RWKV-4 (x040) language model, as BlinkDL's RWKV-LM `RWKV-v4neo/src/model.py` defines it.

Parameter names, shapes, the block structure and the initialisation follow RWKV-LM v4neo so that
its checkpoints, the `rwkv` pip package and `transformers.RwkvForCausalLM` interoperate by renaming
keys only. Two modes:

- parallel (`model(idx)`): the whole sequence at once, WKV through `train.wkv.wkv`, for training;
- RNN (`model.forward_rnn(tokens, state)`): carries the standard RWKV-4 state for inference;
- parallel from a state (`model.forward_with_state(idx, state) -> (logits, state)`): the parallel mode
  after a carried state, differentiable in it, for training a long window in segments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig
from train.model import RWKV, token_shift
from train.wkv import wkv, wkv_state, wkv_with_state

# RNN state layout per layer, as the `rwkv` package keeps it: the time-mixing input of the previous
# token, the WKV numerator/denominator (aa, bb) scaled by exp(-pp), the running max exponent pp,
# and the channel-mixing input of the previous token.
STATE_ATT_X, STATE_AA, STATE_BB, STATE_PP, STATE_FFN_X = range(5)
STATE_SLOTS = 5
# pp starts at "minus infinity" in a finite form, so pp + w stays finite (as the rwkv package does).
PP_INIT = -1e38


def _mix(xx: torch.Tensor, dx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x * mix + xx * (1 - mix), written as xx + (x - xx) * mix with dx = x - xx shared by the mixes."""
    return torch.addcmul(xx, dx, mix)


class TimeMix(nn.Module):
    """RWKV-LM's RWKV_TimeMix: token shift, k/v/r projections, WKV, sigmoid(r) gate, output projection."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C, A = cfg.n_embd, cfg.dim_att
        self.time_decay = nn.Parameter(torch.empty(A))
        self.time_first = nn.Parameter(torch.empty(A))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def _kvr(self, x: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dx = x - xx
        k = self.key(_mix(xx, dx, self.time_mix_k))
        v = self.value(_mix(xx, dx, self.time_mix_v))
        r = self.receptance(_mix(xx, dx, self.time_mix_r))
        return k, v, r

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor | None = None, wkv_s: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> output; with a carried state (x_prev (B, C), wkv_s (3, B, C) = aa, bb, pp)
        -> (output, WKV state after the last token), differentiable in both."""
        k, v, r = self._kvr(x, token_shift(x, x_prev))
        cfg = self.cfg
        if wkv_s is None:
            y = wkv(self.time_decay, self.time_first, k, v, backend=cfg.wkv_backend,
                    chunk_len=cfg.wkv_chunk_len)
            return self.output(torch.sigmoid(r) * y.to(r.dtype))
        y, wkv_s = wkv_state(self.time_decay, self.time_first, k, v, wkv_s, backend=cfg.wkv_backend,
                             chunk_len=cfg.wkv_chunk_len)
        return self.output(torch.sigmoid(r) * y.to(r.dtype)), wkv_s

    def forward_rnn(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); s (5, B, C) this layer's state. Projections run for all T at once; only the
        WKV recurrence steps through time (the rwkv package's stable aa/bb/pp form)."""
        k, v, r = self._kvr(x, token_shift(x, s[STATE_ATT_X]))
        # fp32 k, v as the rwkv package computes; the same kernel as training (CUDA or the CPU twin).
        y, wkv_state = wkv_with_state(
            self.time_decay, self.time_first, k.float(), v.float(), s[STATE_AA : STATE_PP + 1],
            backend=self.cfg.wkv_backend,
        )
        aa, bb, pp = wkv_state.unbind(0)
        out = self.output(torch.sigmoid(r) * y.to(r.dtype))
        new_s = torch.stack([x[:, -1].float(), aa, bb, pp, s[STATE_FFN_X]])
        return out, new_s


class ChannelMix(nn.Module):
    """RWKV-LM's RWKV_ChannelMix: token shift, squared-ReLU key, value, sigmoid(receptance) gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, Fd = cfg.n_embd, cfg.dim_ffn
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def _mixed(self, x: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        dx = x - xx
        k = torch.square(torch.relu(self.key(_mix(xx, dx, self.time_mix_k))))
        return torch.sigmoid(self.receptance(_mix(xx, dx, self.time_mix_r))) * self.value(k)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        return self._mixed(x, token_shift(x, x_prev))

    def forward_rnn(self, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mixed(x, token_shift(x, x_prev)), x[:, -1].float()


class Block(nn.Module):
    """Pre-LN residual block: (ln0 on block 0), x + att(ln1(x)), x + ffn(ln2(x))."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        eps = cfg.layer_norm_eps
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(
        self, x: torch.Tensor, s: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> x; with this layer's carried state s (5, B, C) -> (x, state after the last
        token), differentiable in s (submodules are called, not their methods: ZeRO-3 gathers on call)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        if s is None:
            x = x + self.att(self.ln1(x))
            return x + self.ffn(self.ln2(x))
        xa = self.ln1(x)
        att_out, wkv_s = self.att(xa, s[STATE_ATT_X], s[STATE_AA : STATE_PP + 1])
        x = x + att_out
        xf = self.ln2(x)
        x = x + self.ffn(xf, s[STATE_FFN_X])
        new_s = torch.cat([xa[:, -1:].transpose(0, 1).to(s.dtype), wkv_s.to(s.dtype),
                           xf[:, -1:].transpose(0, 1).to(s.dtype)])
        return x, new_s

    def forward_rnn(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_id == 0:
            x = self.ln0(x)
        att_out, s = self.att.forward_rnn(self.ln1(x), s)
        x = x + att_out
        ffn_out, ffn_x = self.ffn.forward_rnn(self.ln2(x), s[STATE_FFN_X])
        x = x + ffn_out
        return x, torch.cat([s[:STATE_FFN_X], ffn_x.unsqueeze(0)])


class Model(RWKV):
    """RWKV-4 language model. `model(idx) -> logits`; `model.forward_rnn(tokens, state)` for inference."""

    Block = Block

    # ----------------------------------------------------------------------------- initialisation
    def _init_value(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        """RWKV-LM v4neo initialisation (RWKV-v4neo/src/model.py), the fp32 value of parameter `name`.

        Vectors: the "fancy init" in RWKV_TimeMix.__init__ / RWKV_ChannelMix.__init__ with
        ratio_0_to_1 = layer_id / (n_layer - 1), ratio_1_to_almost0 = 1 - layer_id / n_layer,
        ddd[i] = i / n_embd:
          time_decay[h] = -5 + 8 * (h / (dim_att - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
          time_first    = log(0.3) + zigzag, zigzag[i] = 0.5 * ((i + 1) % 3 - 1)
          att.time_mix_k = ddd ** ratio_1_to_almost0
          att.time_mix_v = ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1
          att.time_mix_r = ddd ** (0.5 * ratio_1_to_almost0)
          ffn.time_mix_k = ffn.time_mix_r = ddd ** ratio_1_to_almost0
        LayerNorms: weight 1, bias 0.
        Matrices: RWKV.generate_init_weight: gain = sqrt(rows / cols) when rows > cols; scale 0
        (zeros) for att.key, att.receptance, att.output, ffn.value, ffn.receptance; head scale 0.5;
        emb scale -1e-4 (uniform in [-1e-4, 1e-4]); everything else orthogonal with gain * scale
        (att.value, ffn.key).
        """
        shape, parts = tuple(p.shape), name.split(".")
        if name.startswith("blocks.") and parts[3].startswith("time_"):
            layer_id = int(parts[1])
            vec = _fancy_vector(parts[2], parts[3], layer_id, self.cfg)
            return torch.from_numpy(vec.astype(np.float32)).reshape(shape).to(p.device)
        if parts[-2].startswith("ln"):
            fill = 1.0 if parts[-1] == "weight" else 0.0
            return p.new_full(shape, fill, dtype=torch.float32)
        out = p.new_zeros(shape, dtype=torch.float32)
        zero_init = (".att.key.", ".att.receptance.", ".att.output.", ".ffn.value.", ".ffn.receptance.")
        if any(z in name for z in zero_init):
            return out
        gen = torch.Generator(device=p.device)
        gen.manual_seed(seed)
        if name == "emb.weight":
            return nn.init.uniform_(out, a=-1e-4, b=1e-4, generator=gen)
        rows, cols = shape
        gain = math.sqrt(rows / cols) if rows > cols else 1.0
        scale = 0.5 if name == "head.weight" else 1.0
        return nn.init.orthogonal_(out, gain=gain * scale, generator=gen)

    # ----------------------------------------------------------------------------- parallel mode
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size)."""
        x = self.emb(idx)
        for block in self.blocks:
            if self.cfg.grad_cp and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_out(x))

    def forward_with_state(
        self, idx: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) after `state` (None: a fresh one) -> logits (B, T, V) and the state after the last
        token, (n_layer, 5, B, n_embd) as `init_state` lays it out (fp32; fp64 for an fp64 model).

        The parallel mode continued from a carried state: training a long window in segments feeds each
        segment the previous one's state. Differentiable in the input state (slots att_x, aa, bb, ffn_x;
        pp is the WKV's normaliser and carries no gradient, see train.wkv), so gradients may flow back
        across segments. The input state is not modified."""
        B = idx.shape[0]
        if state is None:
            fp64 = self.emb.weight.dtype == torch.float64
            state = self.init_state(B, idx.device, torch.float64 if fp64 else torch.float32)
        expected = (self.cfg.n_layer, STATE_SLOTS, B, self.cfg.n_embd)
        if tuple(state.shape) != expected:
            raise ValueError(f"forward_with_state: state has shape {tuple(state.shape)}, expected {expected}")
        return self._logits_with_stacked_state(idx, state)

    # ----------------------------------------------------------------------------- RNN mode
    def init_state(
        self,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Fresh RNN state, shape (n_layer, 5, [batch_size,] n_embd); slots STATE_ATT_X..STATE_FFN_X.
        fp32 unless dtype says otherwise."""
        device = device if device is not None else self.emb.weight.device
        dtype = dtype or torch.float32
        shape = (
            (self.cfg.n_layer, STATE_SLOTS)
            + ((batch_size,) if batch_size is not None else ())
            + (self.cfg.n_embd,)
        )
        state = torch.zeros(shape, dtype=dtype, device=device)
        state[:, STATE_PP] = PP_INIT
        return state

    def forward_rnn(
        self, tokens: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed tokens (T,) or (B, T) after `state`; return the last token's logits ((V,) or (B, V))
        and the new state ((n_layer, 5, C) or (n_layer, 5, B, C)). The input state is not modified."""
        if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
            raise ValueError(
                f"forward_rnn expects tokens of shape (T,) or (B, T) with T >= 1, got {tuple(tokens.shape)}"
            )
        unbatched = tokens.dim() == 1
        if unbatched:
            tokens = tokens.unsqueeze(0)
        B = tokens.shape[0]
        if state is None:
            state = self.init_state(B, tokens.device)
        elif unbatched:
            state = state.unsqueeze(2)
        expected = (self.cfg.n_layer, STATE_SLOTS, B, self.cfg.n_embd)
        if tuple(state.shape) != expected:
            raise ValueError(f"forward_rnn state has shape {tuple(state.shape)}, expected {expected}")
        x = self.emb(tokens)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block.forward_rnn(x, state[i])
            new_states.append(s)
        logits = self.head(self.ln_out(x[:, -1]))
        new_state = torch.stack(new_states)
        if unbatched:
            return logits.squeeze(0), new_state.squeeze(2)
        return logits, new_state


def _fancy_vector(kind: str, param: str, layer_id: int, cfg: ModelConfig) -> np.ndarray:
    """RWKV-LM's per-channel vectors in float64 (numpy: zero.Init casts torch's float64 constructors)."""
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / L
    ddd = np.arange(C, dtype=np.float64) / C
    if param == "time_decay":
        return -5 + 8 * (np.arange(A, dtype=np.float64) / (A - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
    if param == "time_first":
        zigzag = ((np.arange(A) + 1) % 3 - 1).astype(np.float64) * 0.5
        return np.ones(A, dtype=np.float64) * math.log(0.3) + zigzag
    if param == "time_mix_r" and kind == "att":
        return np.power(ddd, 0.5 * ratio_1_to_almost0)
    if param == "time_mix_v":
        return np.power(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1
    return np.power(ddd, ratio_1_to_almost0)  # att.time_mix_k, ffn.time_mix_k, ffn.time_mix_r


# ------------------------------------------------------------------------------- what the pipeline asks
def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """ModelConfig fields recovered from a state dict's tensor shapes (when no config was recorded)."""
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    vocab_size, n_embd = shapes["emb.weight"]
    cfg: dict[str, Any] = {"arch": "rwkv4", "n_layer": max(layers) + 1, "n_embd": n_embd,
                           "vocab_size": vocab_size}
    if "blocks.0.ffn.key.weight" in shapes:
        cfg["dim_ffn"] = shapes["blocks.0.ffn.key.weight"][0]
    if "blocks.0.att.key.weight" in shapes:
        cfg["dim_att"] = shapes["blocks.0.att.key.weight"][0]
    return cfg


# WKV cost per (token, channel): the forward recurrence (two exps, a max, four multiply-adds,
# a division; see cuda/ header) counted as ~10 FLOPs, its backward as twice that.
WKV_FLOPS_FWD_PER_CHANNEL = 10
WKV_FLOPS_FWD_BWD_PER_CHANNEL = 3 * WKV_FLOPS_FWD_PER_CHANNEL


def n_params(cfg: ModelConfig) -> int:
    """Parameter count: 2VD + 13D^2 L + D(11L + 4) for dim_att = D, dim_ffn = 4D.

    Per layer: 4 D x D in time mixing, D x 4D + 4D x D + D x D in channel mixing (13 D^2);
    ln1, ln2 (4D), time_decay, time_first, 3 time_mix (5D), 2 channel time_mix (2D) = 11D.
    Once: ln0 and ln_out (4D), embedding and untied head (2VD).
    """
    D, L, V, F = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    per_layer = 4 * D * D + 2 * D * F + D * D + 11 * D
    return 2 * V * D + L * per_layer + 4 * D


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matrix multiply per token (all but the embedding lookup and vectors)."""
    D, L, V, F = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    return L * (5 * D * D + 2 * D * F) + V * D


def wkv_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs of the WKV recurrence per token (forward + backward)."""
    return WKV_FLOPS_FWD_BWD_PER_CHANNEL * cfg.dim_att * cfg.n_layer


def activation_values_per_layer(cfg: ModelConfig) -> int:
    """16-bit values a layer keeps per token for the backward, without checkpointing: about 30 n_embd.

    Time mixing: LayerNorm in/out, three token-shift mixes, k, v, r, sigmoid(r), wkv, its product;
    channel mixing: LayerNorm in/out, two mixes, r, sigmoid(r), output, and three 4 n_embd tensors
    around relu^2.
    """
    return 30 * cfg.n_embd


def wkv_scratch_bytes(cfg: ModelConfig, ctx_len: int, micro_batch: int) -> int:
    """The CUDA WKV backward's scratch: one (2, B, T, C) fp32 tensor per call, T = chunk (wkv4_op.cpp)."""
    steps = min(cfg.wkv_chunk_len or ctx_len, ctx_len)
    return 2 * 4 * micro_batch * steps * cfg.dim_att


ADAM_EPS = 1e-8  # RWKV-LM v4neo's default adam_eps


def lr_scale(name: str, layerwise_lr: bool) -> float:
    """RWKV-LM v4neo (layerwise_lr > 0, my_pile_stage != 2): time_decay 2x, time_first 3x, the rest 1x."""
    if layerwise_lr and "time_decay" in name:
        return 2.0
    if layerwise_lr and "time_first" in name:
        return 3.0
    return 1.0


def decays(name: str, matrix_dims: int) -> bool:
    """Weight decay (when enabled) on every parameter whose squeezed shape has two or more dimensions."""
    return matrix_dims >= 2
