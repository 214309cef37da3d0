"""RWKV-5 "Eagle" (x052) language model, as BlinkDL's RWKV-LM `RWKV-v5/src/model.py` defines it
(RWKV_Tmix_x052 / RWKV_CMix_x052). RWKV-6 (`train.models.rwkv6`) reuses the block, the model, the
state and the two modes defined here and replaces the time and channel mixing.

Parameter names and shapes are RWKV-LM's, so its `.pth` checkpoints load unchanged and ours load in
the `rwkv` package (which detects v5.2 from `ln_x`, `gate` and a [H, N] `time_decay`). Per block,
with C = n_embd, H = C / head_size heads of N = head_size (64):

    x = ln0(emb(idx))                                        (block 0 only)
    x = x + att(ln1(x));  x = x + ffn(ln2(x))
    logits = head(ln_out(x))

Time mixing (`TimeMix`), with xx = shift(x) (the previous token's input, zeros at t = 0) and
x_* = x * time_mix_* + xx * (1 - time_mix_*) for * in k, v, r, g:

    r = receptance(x_r);  k = key(x_k);  v = value(x_v);  g = silu(gate(x_g))
    y = WKV6(r, w = time_decay, k, v, u = time_faaaa)     (train.wkv6; decay exp(-exp(time_decay)),
                                                           constant in time: RWKV-5's case)
    out = output(ln_x(y) * g)        (ln_x: GroupNorm(H) with eps 64e-5: RWKV-LM writes
                                      ln_x(y / head_size_divisor) with eps 1e-5, divisor 8, which
                                      is the same function; the rwkv package uses eps 64e-5)

Channel mixing (`ChannelMix`): out = sigmoid(receptance(x_r)) * value(relu(key(x_k))^2), the mixes
as in time mixing.

Two modes:

- parallel (`model(idx)`, `model.forward_with_state(idx, state)`): whole sequences, WKV through
  `train.wkv6.wkv6`, for training;
- RNN (`model.forward_rnn(tokens, state)`): the same code path fed from a carried state (see `State`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig
from train.model import RWKV, token_shift
from train.wkv6 import wkv6

# ln_x: GroupNorm eps. RWKV-LM x060 uses (1e-5) * head_size_divisor**2 = 64e-5; x052 divides by the
# divisor (8) before a GroupNorm with eps 1e-5, the same function.
GROUP_NORM_EPS = 64e-5
ATT_MIXES = ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g")
FFN_MIXES = ("time_mix_k", "time_mix_r")


class State(NamedTuple):
    """RNN state of the whole model; the layer is the leading dimension of every tensor.

    - ``att_x`` (n_layer, B, C): the time-mixing input (after ln1) of the previous token;
    - ``wkv``   (n_layer, B, H, N, N): the WKV-6 matrix state per head, indexed [key i, value j], fp32;
    - ``ffn_x`` (n_layer, B, C): the channel-mixing input (after ln2) of the previous token.

    Unbatched (tokens of shape (T,)): the same without the B dimension. fp32 (fp64 for an fp64 model).
    The `rwkv` package (v5.2 and v6.0) keeps the same three tensors per layer in a flat list, its WKV
    state indexed the same way: state[3i+0] = att_x[i], state[3i+1] = wkv[i], state[3i+2] = ffn_x[i].
    """

    att_x: torch.Tensor
    wkv: torch.Tensor
    ffn_x: torch.Tensor

    def to_rwkv_package(self) -> list[torch.Tensor]:
        """The `rwkv` package's flat per-layer list [att_x, wkv, ffn_x] * n_layer (unbatched state)."""
        return [t for i in range(self.wkv.shape[0]) for t in (self.att_x[i], self.wkv[i], self.ffn_x[i])]

    @classmethod
    def from_rwkv_package(cls, flat: list[torch.Tensor]) -> State:
        return cls(torch.stack(flat[0::3]), torch.stack(flat[1::3]), torch.stack(flat[2::3]))


def _mix(x: torch.Tensor, xx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x * mix + xx * (1 - mix) (RWKV-5's token-shift mix), as xx + (x - xx) * mix."""
    return torch.addcmul(xx, x - xx, mix)


class TimeMix(nn.Module):
    """RWKV-LM's RWKV_Tmix_x052 (see the module docstring for the formulas)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C, A, N = cfg.n_embd, cfg.dim_att, cfg.head_size
        self.n_head, self.head_size = A // N, N
        for name in ATT_MIXES:  # RWKV-LM's order of definition (the init seeds follow it)
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.time_decay = nn.Parameter(torch.empty(self.n_head, N))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_head, N))
        self._projections(cfg)

    def _projections(self, cfg: ModelConfig) -> None:
        C, A = cfg.n_embd, cfg.dim_att
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, A, eps=GROUP_NORM_EPS)

    def rkvgw(self, x: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """r, k, v, g and the log-log decay w (B, T, A) from x and its shifted copy xx."""
        xk, xv, xr, xg = (_mix(x, xx, getattr(self, n)) for n in ATT_MIXES)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay.reshape(1, 1, -1).to(r.dtype).expand_as(r)  # constant in time
        return r, k, v, g, w

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor | None = None, s: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); x_prev (B, C) / s (B, H, N, N): the carried token shift and WKV state (None:
        zeros). Returns (out, final WKV state)."""
        B, T, _ = x.shape
        H, N = self.n_head, self.head_size
        r, k, v, g, w = self.rkvgw(x, token_shift(x, x_prev))

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, H, N)

        y, s = wkv6(heads(r), heads(w), heads(k), heads(v), self.time_faaaa, state=s,
                    backend=self.cfg.wkv_backend)
        y = self.ln_x(y.reshape(B * T, H * N).to(x.dtype)).view(B, T, H * N)
        return self.output(y * g), s


class ChannelMix(nn.Module):
    """RWKV-LM's RWKV_CMix_x052: sigmoid(receptance(x_r)) * value(relu(key(x_k))^2)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        for name in FFN_MIXES:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, cfg.n_embd)))
        self._projections(cfg)

    def _projections(self, cfg: ModelConfig) -> None:
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def mixes(self, x: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _mix(x, xx, self.time_mix_k), _mix(x, xx, self.time_mix_r)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        xk, xr = self.mixes(x, token_shift(x, x_prev))
        k = torch.relu(self.key(xk)) ** 2
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class Block(nn.Module):
    """Pre-LN residual block: (ln0 on block 0), x + att(ln1(x)), x + ffn(ln2(x))."""

    TimeMix: type[nn.Module] = TimeMix
    ChannelMix: type[nn.Module] = ChannelMix

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        eps = cfg.layer_norm_eps
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=eps)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.att = self.TimeMix(cfg, layer_id)
        self.ffn = self.ChannelMix(cfg, layer_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_id == 0:
            x = self.ln0(x)
        x = x + self.att(self.ln1(x))[0]
        return x + self.ffn(self.ln2(x))

    def forward_with_state(
        self, x: torch.Tensor, att_x: torch.Tensor, wkv_state: torch.Tensor, ffn_x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As forward, from this layer's carried state; returns (x, att_x, wkv, ffn_x) after it."""
        if self.layer_id == 0:
            x = self.ln0(x)
        xa = self.ln1(x)
        att_out, wkv_state = self.att(xa, att_x, wkv_state)
        x = x + att_out
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_x)
        return x, xa[:, -1].to(att_x.dtype), wkv_state.to(att_x.dtype), xf[:, -1].to(ffn_x.dtype)


class Model(RWKV):
    """RWKV-5 language model. `model(idx) -> logits`; `model.forward_rnn(tokens, state)` for inference;
    `model.forward_with_state(idx, state) -> (logits, state)` for training across windows."""

    Block = Block
    TITLE = "RWKV-5"

    # ----------------------------------------------------------------------------- initialisation
    def _init_value(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        """RWKV-LM v5 initialisation, the fp32 value of parameter `name`: RWKV_Tmix_x052 /
        RWKV_CMix_x052.__init__ for the time_* vectors, then RWKV.generate_init_weight (train.py calls it
        for a new model) for the rest. With ratio_0_to_1 = l / (L - 1), ratio_1_to_almost0 = 1 - l / L,
        ddd[i] = i / C, n = 0 .. A - 1:

          att.time_mix_k = ddd ** ratio_1_to_almost0;  att.time_mix_v = that + 0.3 ratio_0_to_1
          att.time_mix_r = att.time_mix_g = ddd ** (0.5 ratio_1_to_almost0)
          att.time_decay = -6 + 5 (n / (A-1)) ** (0.7 + 1.3 ratio_0_to_1)          (H x N)
          att.time_faaaa = ratio_0_to_1 (1 - n / (A-1)) + ((n + 1) % 3 - 1) 0.1    (H x N)
          ffn.time_mix_k = ffn.time_mix_r = ddd ** ratio_1_to_almost0
          att.ln_x.weight = ((1 + l) / L) ** 0.7;  ln_x.bias = 0;  LayerNorms: weight 1, bias 0
          emb: uniform in [-1e-4, 1e-4];  head: orthogonal, gain 0.5 sqrt(V / C) (0.5 when V <= C)
          att.receptance, att.value, ffn.key: orthogonal, gain 1;  att.key, att.gate: orthogonal, gain 0.1
          att.output, ffn.value, ffn.receptance: zeros
        """
        shape, parts = tuple(p.shape), name.split(".")
        if name.startswith("blocks.") and parts[3].startswith("time_"):
            value = self._init_time_param(parts[2], parts[3], int(parts[1]), p, seed)
            return value.reshape(shape).to(p.device)
        if parts[-2] == "ln_x" and parts[-1] == "weight":
            layer_scale = ((1 + int(parts[1])) / self.cfg.n_layer) ** 0.7
            return p.new_full(shape, layer_scale, dtype=torch.float32)
        if parts[-2].startswith("ln"):
            return p.new_full(shape, 1.0 if parts[-1] == "weight" else 0.0, dtype=torch.float32)
        out = p.new_zeros(shape, dtype=torch.float32)
        if any(z in name for z in (".att.output.", ".ffn.value.", ".ffn.receptance.")):
            return out
        gen = torch.Generator(device=p.device)
        gen.manual_seed(seed)
        if name == "emb.weight":
            return nn.init.uniform_(out, a=-1e-4, b=1e-4, generator=gen)
        if name == "head.weight":
            V, C = self.cfg.vocab_size, self.cfg.n_embd
            gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
        elif ".att.key." in name or ".att.gate." in name:
            gain = 0.1
        else:  # att.receptance, att.value, ffn.key
            gain = 1.0
        return nn.init.orthogonal_(out, gain=gain, generator=gen)

    def _init_time_param(
        self, kind: str, param: str, layer_id: int, p: torch.Tensor, seed: int
    ) -> torch.Tensor:
        vec = init_vector_x052(kind, param, layer_id, self.cfg)
        return torch.from_numpy(vec.astype(np.float32))

    # ----------------------------------------------------------------------------- parallel mode
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size), from a zero state."""
        x = self.emb(idx)
        for block in self.blocks:
            if self.cfg.grad_cp and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_out(x))

    def _run_with_state(self, x: torch.Tensor, state: State, grad_cp: bool) -> tuple[torch.Tensor, State]:
        att_x, wkv_s, ffn_x = [], [], []
        for i, block in enumerate(self.blocks):
            args = (x, state.att_x[i], state.wkv[i], state.ffn_x[i])
            if grad_cp:
                x, sa, sw, sf = checkpoint(block.forward_with_state, *args, use_reentrant=False)
            else:
                x, sa, sw, sf = block.forward_with_state(*args)
            att_x.append(sa)
            wkv_s.append(sw)
            ffn_x.append(sf)
        return x, State(torch.stack(att_x), torch.stack(wkv_s), torch.stack(ffn_x))

    def forward_with_state(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """idx (B, T) after `state` (None: zeros) -> logits (B, T, V) and the state after the last token.

        Differentiable in the input state too (unlimited-context training carries it across windows,
        detached or not). The input state is not modified.
        """
        state = self._check_state(state, idx.shape[0], idx.device)
        grad_cp = self.cfg.grad_cp and torch.is_grad_enabled()
        x, new_state = self._run_with_state(self.emb(idx), state, grad_cp)
        return self.head(self.ln_out(x)), new_state

    # ----------------------------------------------------------------------------- RNN mode
    def init_state(
        self,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """Zero state (see `State`): fp32 (fp64 for an fp64 model), batched unless batch_size is None."""
        device = device if device is not None else self.emb.weight.device
        if dtype is None:
            dtype = torch.float64 if self.emb.weight.dtype == torch.float64 else torch.float32
        L, C, A, N = self.cfg.n_layer, self.cfg.n_embd, self.cfg.dim_att, self.cfg.head_size
        b = (batch_size,) if batch_size is not None else ()
        return State(
            torch.zeros((L, *b, C), dtype=dtype, device=device),
            torch.zeros((L, *b, A // N, N, N), dtype=dtype, device=device),
            torch.zeros((L, *b, C), dtype=dtype, device=device),
        )

    def _check_state(self, state: State | None, B: int, device: torch.device) -> State:
        if state is None:
            return self.init_state(B, device)
        L, C, A, N = self.cfg.n_layer, self.cfg.n_embd, self.cfg.dim_att, self.cfg.head_size
        expected = ((L, B, C), (L, B, A // N, N, N), (L, B, C))
        got = tuple(tuple(t.shape) for t in state)
        if got != expected:
            raise ValueError(f"{self.TITLE} state has shapes {got}, expected {expected} (att_x, wkv, ffn_x)")
        return State(*state)

    def forward_rnn(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Feed tokens (T,) or (B, T) after `state`; return the last token's logits ((V,) or (B, V)) and
        the new state (unbatched or batched as the tokens; see `State`). The input state is not modified.

        The same computation as the parallel mode: all T tokens go through each layer at once, the WKV
        recurrence continuing from the carried state (`wkv6(..., state=...)`, the training kernel).
        """
        if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
            raise ValueError(
                f"forward_rnn expects tokens of shape (T,) or (B, T) with T >= 1, got {tuple(tokens.shape)}"
            )
        unbatched = tokens.dim() == 1
        if unbatched:
            tokens = tokens.unsqueeze(0)
            if state is not None:
                state = State(*(t.unsqueeze(1) for t in state))
        state = self._check_state(state, tokens.shape[0], tokens.device)
        x, new_state = self._run_with_state(self.emb(tokens), state, grad_cp=False)
        logits = self.head(self.ln_out(x[:, -1]))
        if unbatched:
            return logits.squeeze(0), State(*(t.squeeze(1) for t in new_state))
        return logits, new_state


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """RWKV-LM's (ratio_0_to_1, ratio_1_to_almost0) = (l / (L - 1), 1 - l / L); 0 for a 1-layer model."""
    return (layer_id / (n_layer - 1) if n_layer > 1 else 0.0), 1.0 - layer_id / n_layer


def decay_and_bonus(layer_id: int, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """time_decay and time_faaaa over n = 0 .. A-1 (shared by x052 and x060; see Model._init_value)."""
    ratio_0_to_1, _ = layer_ratios(layer_id, cfg.n_layer)
    n = np.arange(cfg.dim_att, dtype=np.float64)
    frac = n / (cfg.dim_att - 1) if cfg.dim_att > 1 else n
    decay = -6 + 5 * frac ** (0.7 + 1.3 * ratio_0_to_1)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    return decay, ratio_0_to_1 * (1 - frac) + zigzag


def init_vector_x052(kind: str, param: str, layer_id: int, cfg: ModelConfig) -> np.ndarray:
    """RWKV-LM x052's per-channel vectors in float64 (see Model._init_value)."""
    ratio_0_to_1, ratio_1_to_almost0 = layer_ratios(layer_id, cfg.n_layer)
    ddd = np.arange(cfg.n_embd, dtype=np.float64) / cfg.n_embd
    if kind == "ffn" or param == "time_mix_k":
        return np.power(ddd, ratio_1_to_almost0)
    if param == "time_mix_v":
        return np.power(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1
    if param in ("time_mix_r", "time_mix_g"):
        return np.power(ddd, 0.5 * ratio_1_to_almost0)
    decay, bonus = decay_and_bonus(layer_id, cfg)
    if param == "time_decay":
        return decay
    if param == "time_faaaa":
        return bonus
    raise KeyError(f"no initial vector for {kind}.{param}")


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, int | str]:
    """The ModelConfig shape fields of an RWKV-5 state dict in RWKV-LM names (a released .pth, ours)."""
    return config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})


def common_shapes(shapes: Mapping[str, tuple[int, ...]], arch: str) -> dict[str, int | str]:
    """arch, n_layer, n_embd, vocab_size, head_size, dim_att, dim_ffn of an x052/x060 state dict."""
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    vocab_size, n_embd = shapes["emb.weight"]
    n_head, head_size = shapes["blocks.0.att.time_faaaa"][-2:]
    return {
        "arch": arch,
        "n_layer": max(layers) + 1,
        "n_embd": int(n_embd),
        "vocab_size": int(vocab_size),
        "head_size": int(head_size),
        "dim_att": int(shapes["blocks.0.att.receptance.weight"][0]),
        "dim_ffn": int(shapes["blocks.0.ffn.key.weight"][0]),
    }


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int | str]:
    """`config_from_state_dict` from the tensors' shapes alone (what a checkpoint reader has)."""
    if "blocks.0.att.time_mix_g" not in shapes:
        raise KeyError("not an RWKV-5 (x052) state dict: no blocks.0.att.time_mix_g")
    return common_shapes(shapes, "rwkv5")


# ------------------------------------------------------------------------------- what the pipeline asks

# WKV-6 forward per head and token (N = head_size): k v^T (N^2), u * kv added to S (2 N^2), r (S + u kv)
# (2 N^2), S decayed and kv added (2 N^2): 7 N^2 FLOPs, 7 N per channel. The backward runs the
# recurrence backwards for dS and one contraction per input (r, w, k, v): about twice that.
WKV6_FLOPS_FWD_PER_CHANNEL_PER_N = 7
WKV6_FLOPS_FWD_BWD_PER_CHANNEL_PER_N = 3 * WKV6_FLOPS_FWD_PER_CHANNEL_PER_N


def n_params(cfg: ModelConfig) -> int:
    """Parameter count: 2VC + 4C + L (5 C A + C^2 + 2 C F + 4C + 4A + 6C).

    Per layer: receptance, key, value, gate (C x A), output (A x C), ffn receptance (C^2), ffn key and
    value (2 C F); vectors: 4 time_mix (4C), time_decay and time_faaaa (2A), ln_x (2A), 2 ffn time_mix
    (2C), ln1, ln2 (4C). Once: ln0 and ln_out (4C), embedding and untied head (2VC).
    """
    C, A, L, V, Fd = cfg.n_embd, cfg.dim_att, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    return 2 * V * C + 4 * C + L * (5 * C * A + C * C + 2 * C * Fd + 10 * C + 4 * A)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matrix multiply per token: the projections and the head."""
    C, A, L, V, Fd = cfg.n_embd, cfg.dim_att, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    return L * (5 * C * A + C * C + 2 * C * Fd) + V * C


def wkv_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs of the WKV-6 recurrence per token (forward + backward): 21 N per channel and
    layer (see WKV6_FLOPS_FWD_PER_CHANNEL_PER_N)."""
    return WKV6_FLOPS_FWD_BWD_PER_CHANNEL_PER_N * cfg.head_size * cfg.dim_att * cfg.n_layer


def activation_values_per_layer(cfg: ModelConfig) -> int:
    """16-bit values a layer keeps per token for the backward, without checkpointing: (22 + N/8) n_embd
    plus 3 dim_ffn (measured with saved-tensor hooks at dim_att = n_embd, tests/test_estimate.py).

    Time mixing: ln1 out, the shift, the four mixes, the gate and its silu, ln_x in/out, y * g (about
    14 n_embd), the WKV-6 kernel's inputs r, w, k, v (4 n_embd) and its fp32 state checkpoint every 16
    steps (H N^2 / 16 fp32 per token: N/8 n_embd). Channel mixing: ln2 out, the shift, two mixes, r, its
    sigmoid, value(.) (about 4 n_embd) and three dim_ffn tensors around relu^2.
    """
    return (22 + cfg.head_size // 8) * cfg.n_embd + 3 * cfg.dim_ffn


def wkv_scratch_bytes(cfg: ModelConfig, ctx_len: int, micro_batch: int) -> int:
    """Transient memory of the WKV-6 backward beyond the input gradients: one chunk's recomputed states,
    (B, H, 16, N, N) fp32 (train.wkv6), for one layer at a time."""
    del ctx_len
    return micro_batch * cfg.dim_att * cfg.head_size * 16 * 4


ADAM_EPS = 1e-8  # RWKV-LM v5 train.py's default adam_eps


def lr_scale(name: str, layerwise_lr: bool) -> float:
    """RWKV-LM v5 configure_optimizers (layerwise_lr > 0, my_pile_stage != 2): the LoRA factors (`_w1`,
    `_w2`), time_mix / time_maa and time_faaaa 1x; time_decay 2x; the rest 1x."""
    if layerwise_lr and "time_decay" in name and "_w1" not in name and "_w2" not in name:
        return 2.0
    return 1.0


def decays(name: str, matrix_dims: int) -> bool:
    """RWKV-LM v5: weight decay (when enabled) on parameters whose squeezed shape has two or more
    dimensions and whose name has ".weight": the projections, emb and head; not time_decay
    ([H, N] in x052) nor the x060 LoRA factors."""
    return matrix_dims >= 2 and ".weight" in name
