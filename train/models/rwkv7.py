"""RWKV-7 "Goose" (x070) language model, as BlinkDL's RWKV-LM `RWKV-v7/train_temp/src/model.py` defines it.

Parameter names and shapes are exactly RWKV-LM's (its "slow pytorch version" of RWKV_Tmix_x070 /
RWKV_CMix_x070), so its `.pth` checkpoints load unchanged and ours load in RWKV-LM and in the `rwkv`
package (`RWKV_V7_ON=1`). Per block, with C = n_embd, H = C / head_size heads of N = head_size:

    x = ln0(emb(idx))                                        (block 0 only)
    x = x + att(ln1(x), v_first);  x = x + ffn(ln2(x))
    logits = head(ln_out(x))

Time mixing (`TimeMix`), with xx = shift(x) - x and x_* = x + xx * self.x_* for * in r,w,k,v,a,g:

    r = receptance(x_r);  k = key(x_k);  v = value(x_v)
    w = -softplus(-(w0 + tanh(x_w @ w1) @ w2)) - 0.5        (decay factor exp(-exp(w)) in (0.545, 1))
    v_first = v (layer 0);  v = v + (v_first - v) * sigmoid(v0 + (x_v @ v1) @ v2)   (layers > 0)
    a = sigmoid(a0 + (x_a @ a1) @ a2)                        (in-context learning rate)
    g = sigmoid(x_g @ g1) @ g2                               (output gate)
    kk = L2-normalise(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    y = WKV7(r, w, k, v, a=-kk, b=kk*a)     (train.wkv7: S = S (diag(exp(-exp(w))) + a b^T) + v k^T, y = S r)
    y = ln_x(y) + (sum over each head of r * k * r_k) * v    (ln_x: GroupNorm(H, eps 64e-5))
    out = output(y * g)

Channel mixing (`ChannelMix`): out = value(relu(key(x + xx * x_k))^2).

Layer 0 holds v0/v1/v2 like every layer (RWKV-LM creates them; its checkpoints carry them), but does not
use them: their gradient is None (never zero-filled by autograd).

Two modes:

- parallel (`model(idx)`, `model.forward_with_state(idx, state)`): whole sequences, WKV through
  `train.wkv7.wkv7`, for training;
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
from train.wkv7 import wkv7

GROUP_NORM_EPS = 64e-5  # ln_x: RWKV-LM's "!!! notice eps value !!!" (= head_size * 1e-5)
TIME_MIX_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
LORAS = ("w", "a", "v", "g")  # w1/w2 (decay), a1/a2 (in-context rate), v1/v2 (value residual), g1/g2 (gate)


class State(NamedTuple):
    """RNN state of the whole model; the layer is the leading dimension of every tensor.

    - ``att_x`` (n_layer, B, C): the time-mixing input (after ln1) of the previous token;
    - ``wkv``   (n_layer, B, H, N, N): the WKV-7 matrix state per head, indexed [value i, key j], fp32;
    - ``ffn_x`` (n_layer, B, C): the channel-mixing input (after ln2) of the previous token.

    Unbatched (tokens of shape (T,)): the same without the B dimension. fp32 (fp64 for an fp64 model).
    The `rwkv` package keeps the same three tensors per layer in a flat list: state[3i+0] = att_x[i],
    state[3i+1] = wkv[i], state[3i+2] = ffn_x[i] (see `to_rwkv_package` / `from_rwkv_package`).
    v_first (layer 0's value) belongs to a token, not to the past: it is recomputed for every token
    and not part of the state.
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


def _lerp(x: torch.Tensor, xx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x + xx * mix (xx = shifted x - x), RWKV-7's token-shift mix."""
    return torch.addcmul(x, xx, mix)


class TimeMix(nn.Module):
    """RWKV-LM's RWKV_Tmix_x070 (see the module docstring for the formulas)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C, N = cfg.n_embd, cfg.head_size
        H = cfg.dim_att // N
        self.n_head, self.head_size = H, N
        for name in TIME_MIX_VECTORS:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        widths = {"w": cfg.dim_w_lora, "a": cfg.dim_a_lora, "v": cfg.dim_v_lora, "g": cfg.dim_g_lora}
        # RWKV-LM's order of definition (named_parameters order: the init seeds follow it)
        self.w1 = nn.Parameter(torch.empty(C, widths["w"]))
        self.w2 = nn.Parameter(torch.empty(widths["w"], C))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, widths["a"]))
        self.a2 = nn.Parameter(torch.empty(widths["a"], C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.v1 = nn.Parameter(torch.empty(C, widths["v"]))
        self.v2 = nn.Parameter(torch.empty(widths["v"], C))
        self.v0 = nn.Parameter(torch.empty(1, 1, C))
        self.g1 = nn.Parameter(torch.empty(C, widths["g"]))
        self.g2 = nn.Parameter(torch.empty(widths["g"], C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUP_NORM_EPS)

    def forward(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        x_prev: torch.Tensor | None = None,
        s: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C); v_first: layer 0's v (None in layer 0); x_prev (B, C) / s (B, H, N, N): the
        carried token shift and WKV state (None: zeros). Returns (out, v_first, final WKV state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev) - x
        xr, xw, xk, xv, xa, xg = (_lerp(x, xx, getattr(self, n)) for n in TIME_MIX_VECTORS)

        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # eps 1e-12 as RWKV-LM
        k = k * (1 + (a - 1) * self.k_a)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, H, N)

        y, s = wkv7(
            heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), state=s, backend=self.cfg.wkv_backend
        )
        y = self.ln_x(y.reshape(B * T, C).to(x.dtype)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), v_first, s


class ChannelMix(nn.Module):
    """RWKV-LM's RWKV_CMix_x070: token shift, squared-ReLU key (C -> dim_ffn), value (dim_ffn -> C)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        xx = token_shift(x, x_prev) - x
        k = torch.relu(self.key(_lerp(x, xx, self.x_k))) ** 2
        return self.value(k)


class Block(nn.Module):
    """Pre-LN residual block: (ln0 on block 0), x + att(ln1(x)), x + ffn(ln2(x)); carries v_first."""

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

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_id == 0:
            x = self.ln0(x)
        att_out, v_first, _ = self.att(self.ln1(x), v_first)
        x = x + att_out
        return x + self.ffn(self.ln2(x)), v_first

    def forward_with_state(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        att_x: torch.Tensor,
        wkv_state: torch.Tensor,
        ffn_x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As forward, from this layer's carried state; returns (x, v_first, att_x, wkv, ffn_x) after it."""
        if self.layer_id == 0:
            x = self.ln0(x)
        xa = self.ln1(x)
        att_out, v_first, wkv_state = self.att(xa, v_first, att_x, wkv_state)
        x = x + att_out
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_x)
        return x, v_first, xa[:, -1].to(att_x.dtype), wkv_state.to(att_x.dtype), xf[:, -1].to(ffn_x.dtype)


class Model(RWKV):
    """RWKV-7 language model. `model(idx) -> logits`; `model.forward_rnn(tokens, state)` for inference;
    `model.forward_with_state(idx, state) -> (logits, state)` for training across windows."""

    Block = Block

    # ----------------------------------------------------------------------------- initialisation
    def _init_value(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        """RWKV-LM v7 initialisation, the fp32 value of parameter `name`: RWKV_Tmix_x070 /
        RWKV_CMix_x070.__init__ for the vectors and LoRA factors, then RWKV.generate_init_weight
        (train.py calls it for a new model) for every name containing ".weight". With
        ratio_0_to_1 = l / (L - 1), ratio_1_to_almost0 = 1 - l / L,
        ddd[i] = i / C, linear[n] = n / (C - 1) - 0.5, zigzag[n] = z |z| with
        z = ((n % N) - (N-1)/2) / ((N-1)/2):

          att.x_r, x_w, x_k, x_v, x_a, x_g = 1 - ddd ** (p * ratio_1_to_almost0),
                                             p = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2
          att.w0  = -6 + 6 (n / (C-1)) ** (1 + ratio_0_to_1 ** 0.3) + 0.5 + 2.5 zigzag
          att.a0  = -0.19 + 0.3 zigzag + 0.4 linear
          att.v0  = 0.73 - 0.4 linear
          att.k_k = 0.71 - 0.1 linear;   att.k_a = 1.02;   att.r_k = -0.04
          att.w1, a1, v1, g1 = 0;  att.w2, a2, v2, g2 = orthogonal, gain 0.1 (x sqrt(rows/cols) if rows>cols)
          ffn.x_k = 1 - ddd ** (ratio_1_to_almost0 ** 4)
          att.ln_x.weight = ((1 + l) / L) ** 0.7;  ln_x.bias = 0;  LayerNorms: weight 1, bias 0
          emb: uniform in [-1e-4, 1e-4];  head: orthogonal, gain 0.5 sqrt(V / C) (0.5 when V <= C)
          att.receptance, att.value, ffn.key: orthogonal, gain 1;  att.key: orthogonal, gain 0.1
          att.output, ffn.value: zeros
        """
        shape, parts = tuple(p.shape), name.split(".")
        if name.startswith("blocks.") and parts[2] in ("att", "ffn") and parts[3] in _VECTOR_PARAMS:
            vec = _init_vector(parts[2], parts[3], int(parts[1]), self.cfg)
            return torch.from_numpy(vec.astype(np.float32)).reshape(shape).to(p.device)
        if parts[-2] == "ln_x" and parts[-1] == "weight":
            layer_scale = ((1 + int(parts[1])) / self.cfg.n_layer) ** 0.7
            return p.new_full(shape, layer_scale, dtype=torch.float32)
        if parts[-2].startswith("ln"):
            return p.new_full(shape, 1.0 if parts[-1] == "weight" else 0.0, dtype=torch.float32)
        out = p.new_zeros(shape, dtype=torch.float32)
        if parts[-1] in ("w1", "a1", "v1", "g1") or ".att.output." in name or ".ffn.value." in name:
            return out
        gen = torch.Generator(device=p.device)
        gen.manual_seed(seed)
        if name == "emb.weight":
            return nn.init.uniform_(out, a=-1e-4, b=1e-4, generator=gen)
        if name == "head.weight":
            V, C = self.cfg.vocab_size, self.cfg.n_embd
            gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
        elif parts[-1] in ("w2", "a2", "v2", "g2"):
            rows, cols = shape
            gain = (math.sqrt(rows / cols) if rows > cols else 1.0) * 0.1
        elif ".att.key." in name:
            gain = 0.1
        else:  # att.receptance, att.value, ffn.key
            gain = 1.0
        return nn.init.orthogonal_(out, gain=gain, generator=gen)

    # ----------------------------------------------------------------------------- parallel mode
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size), from a zero state."""
        x = self.emb(idx)
        v_first = None
        for block in self.blocks:
            if self.cfg.grad_cp and torch.is_grad_enabled():
                x, v_first = checkpoint(block, x, v_first, use_reentrant=False)
            else:
                x, v_first = block(x, v_first)
        return self.head(self.ln_out(x))

    def forward_with_state(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """idx (B, T) after `state` (None: zeros) -> logits (B, T, V) and the state after the last token.

        Differentiable in the input state too (unlimited-context training carries it across windows,
        detached or not). The input state is not modified.
        """
        B = idx.shape[0]
        state = self._check_state(state, B, idx.device)
        x = self.emb(idx)
        v_first = None
        att_x, wkv_s, ffn_x = [], [], []
        for i, block in enumerate(self.blocks):
            args = (x, v_first, state.att_x[i], state.wkv[i], state.ffn_x[i])
            if self.cfg.grad_cp and torch.is_grad_enabled():
                x, v_first, sa, sw, sf = checkpoint(block.forward_with_state, *args, use_reentrant=False)
            else:
                x, v_first, sa, sw, sf = block.forward_with_state(*args)
            att_x.append(sa)
            wkv_s.append(sw)
            ffn_x.append(sf)
        logits = self.head(self.ln_out(x))
        return logits, State(torch.stack(att_x), torch.stack(wkv_s), torch.stack(ffn_x))

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
        L, C, N = self.cfg.n_layer, self.cfg.n_embd, self.cfg.head_size
        b = (batch_size,) if batch_size is not None else ()
        return State(
            torch.zeros((L, *b, C), dtype=dtype, device=device),
            torch.zeros((L, *b, C // N, N, N), dtype=dtype, device=device),
            torch.zeros((L, *b, C), dtype=dtype, device=device),
        )

    def _check_state(self, state: State | None, B: int, device: torch.device) -> State:
        if state is None:
            return self.init_state(B, device)
        L, C, N = self.cfg.n_layer, self.cfg.n_embd, self.cfg.head_size
        expected = ((L, B, C), (L, B, C // N, N, N), (L, B, C))
        got = tuple(tuple(t.shape) for t in state)
        if got != expected:
            raise ValueError(f"RWKV-7 state has shapes {got}, expected {expected} (att_x, wkv, ffn_x)")
        return State(*state)

    def forward_rnn(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Feed tokens (T,) or (B, T) after `state`; return the last token's logits ((V,) or (B, V)) and
        the new state (unbatched or batched as the tokens; see `State`). The input state is not modified.

        The same computation as the parallel mode: all T tokens go through each layer at once, the WKV
        recurrence continuing from the carried state (`wkv7(..., state=...)`, the training kernel).
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
        x = self.emb(tokens)
        state = self._check_state(state, tokens.shape[0], tokens.device)
        v_first = None
        att_x, wkv_s, ffn_x = [], [], []
        for i, block in enumerate(self.blocks):
            x, v_first, sa, sw, sf = block.forward_with_state(
                x, v_first, state.att_x[i], state.wkv[i], state.ffn_x[i]
            )
            att_x.append(sa)
            wkv_s.append(sw)
            ffn_x.append(sf)
        logits = self.head(self.ln_out(x[:, -1]))
        new_state = State(torch.stack(att_x), torch.stack(wkv_s), torch.stack(ffn_x))
        if unbatched:
            return logits.squeeze(0), State(*(t.squeeze(1) for t in new_state))
        return logits, new_state


# Per-channel parameters whose initial value is a closed formula (see Model.init_weights).
_VECTOR_PARAMS = (*TIME_MIX_VECTORS, "w0", "a0", "v0", "k_k", "k_a", "r_k")
# x_* exponents of ddd ** (p * ratio_1_to_almost0) in RWKV_Tmix_x070.__init__
_TIME_MIX_POWER = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}


def _init_vector(kind: str, param: str, layer_id: int, cfg: ModelConfig) -> np.ndarray:
    """RWKV-LM v7's per-channel vectors in float64 (numpy: zero.Init casts torch's float64 constructors)."""
    C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
    ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / L
    n = np.arange(C, dtype=np.float64)
    ddd = n / C
    if kind == "ffn":  # x_k
        return 1.0 - np.power(ddd, ratio_1_to_almost0**4)
    if param in _TIME_MIX_POWER:
        return 1.0 - np.power(ddd, _TIME_MIX_POWER[param] * ratio_1_to_almost0)
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * np.abs(z)
    if param == "w0":
        www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1**0.3)
        return www + 0.5 + zigzag * 2.5
    if param == "a0":
        return -0.19 + zigzag * 0.3 + linear * 0.4
    if param == "v0":
        return 0.73 - linear * 0.4
    if param == "k_k":
        return 0.71 - linear * 0.1
    if param == "k_a":
        return np.full(C, 1.02)
    if param == "r_k":
        return np.full(C, -0.04)
    raise KeyError(f"no initial vector for {kind}.{param}")


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, int | str]:
    """The ModelConfig shape fields of an RWKV-7 state dict in RWKV-LM names (a released .pth, ours):
    arch, n_layer, n_embd, vocab_size, head_size, dim_att, dim_ffn and the four LoRA widths, read from
    tensor shapes. `ModelConfig(**config_from_state_dict(sd))` builds the model it loads into."""
    return config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int | str]:
    """`config_from_state_dict` from the tensors' shapes alone (what a checkpoint reader has)."""
    if "blocks.0.att.r_k" not in shapes:
        raise KeyError("not an RWKV-7 (x070) state dict: no blocks.0.att.r_k")
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    vocab_size, n_embd = shapes["emb.weight"]
    n_head, head_size = shapes["blocks.0.att.r_k"][-2:]
    v1 = shapes.get("blocks.0.att.v1", shapes.get("blocks.1.att.v1"))
    return {
        "arch": "rwkv7",
        "n_layer": max(layers) + 1,
        "n_embd": int(n_embd),
        "vocab_size": int(vocab_size),
        "head_size": int(head_size),
        "dim_att": int(shapes["blocks.0.att.receptance.weight"][0]),
        "dim_ffn": int(shapes["blocks.0.ffn.key.weight"][0]),
        "dim_w_lora": int(shapes["blocks.0.att.w1"][1]),
        "dim_a_lora": int(shapes["blocks.0.att.a1"][1]),
        "dim_v_lora": int(v1[1]) if v1 is not None else 32,
        "dim_g_lora": int(shapes["blocks.0.att.g1"][1]),
    }


# ------------------------------------------------------------------------------- what the pipeline asks

# WKV-7 forward per head and token (N = head_size): S diag(d) (N^2), S a (2 N^2), (S a) b^T added
# (2 N^2), v k^T added (2 N^2), y = S r (2 N^2): 9 N^2 FLOPs, i.e. 9 N per channel. The backward runs
# the transposed recurrence for dS and one contraction per input (r, w, k, v, a, b): about twice that.
WKV7_FLOPS_FWD_PER_CHANNEL_PER_N = 9
WKV7_FLOPS_FWD_BWD_PER_CHANNEL_PER_N = 3 * WKV7_FLOPS_FWD_PER_CHANNEL_PER_N


def _lora_sum(cfg: ModelConfig) -> int:
    return cfg.dim_w_lora + cfg.dim_a_lora + cfg.dim_v_lora + cfg.dim_g_lora


def n_params(cfg: ModelConfig) -> int:
    """Parameter count: 2VC + 4C + L (4C^2 + 2 C F + 2 C (Dw + Da + Dv + Dg) + 19 C).

    Per layer: receptance, key, value, output (4 C^2); ffn key and value (2 C F); the LoRA pairs
    (C x D and D x C each); vectors: 6 x_* mixes, w0, a0, v0, k_k, k_a, r_k (H x N = C), ln_x (2C),
    ffn.x_k, ln1, ln2 (4C): 19 C. Once: ln0 and ln_out (4C), embedding and untied head (2VC).
    Layer 0's unused v0/v1/v2 are counted (they exist, as in RWKV-LM).
    """
    C, L, V, Fd = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    per_layer = 4 * C * C + 2 * C * Fd + 2 * C * _lora_sum(cfg) + 19 * C
    return 2 * V * C + 4 * C + L * per_layer


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matrix multiply per token: the projections, the LoRA factors (less layer
    0's unused v1/v2) and the head; not the embedding lookup nor the vectors."""
    C, L, V, Fd = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.dim_ffn
    return L * (4 * C * C + 2 * C * Fd + 2 * C * _lora_sum(cfg)) - 2 * C * cfg.dim_v_lora + V * C


def wkv_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs of the WKV-7 recurrence per token (forward + backward): 27 N per channel and
    layer (see WKV7_FLOPS_FWD_PER_CHANNEL_PER_N); ~1.7 MFLOP per layer at C = 768, N = 64."""
    return WKV7_FLOPS_FWD_BWD_PER_CHANNEL_PER_N * cfg.head_size * cfg.dim_att * cfg.n_layer


def activation_values_per_layer(cfg: ModelConfig) -> int:
    """16-bit values a layer keeps per token for the backward, without checkpointing: 49 n_embd plus
    the four LoRA widths (measured with saved-tensor hooks, tests/test_estimate.py).

    Time mixing: ln1 out, the shift, six mixes, r/k/v/w/a/g and their activations, kk and the
    modified k, the value-residual gate, ln_x in/out, the gate product (about 28 n_embd), plus the
    WKV-7 kernel's own saves: a state checkpoint every 16 steps (N^2 / 16 fp32 per head and token,
    16 bytes per channel at N = 64) and S a per step (4 bytes per channel): 10 n_embd in 16-bit
    units. Channel mixing: ln2 out, the shift, the mix, and three 4 n_embd tensors around relu^2.
    """
    return 49 * cfg.n_embd + _lora_sum(cfg)


def wkv_scratch_bytes(cfg: ModelConfig, ctx_len: int, micro_batch: int) -> int:
    """Transient memory of the WKV-7 backward beyond the input gradients: none (its state checkpoints
    and S a are saved by the forward and counted in `activation_values_per_layer`)."""
    del cfg, ctx_len, micro_batch
    return 0


ADAM_EPS = 1e-18  # RWKV-LM x070's training scripts (--adam_eps 1e-18)


def lr_scale(name: str, layerwise_lr: bool) -> float:
    """RWKV-LM v7 configure_optimizers: att.w0 2x, the rest 1x (all 1x without layerwise_lr)."""
    if layerwise_lr and "att.w0" in name:
        return 2.0
    return 1.0


def decays(name: str, matrix_dims: int) -> bool:
    """RWKV-LM v7: weight decay (when enabled) on 2-D parameters whose name has ".weight": the
    projections, emb and head; not the LoRA factors (w1, w2, ...) nor r_k."""
    return matrix_dims >= 2 and ".weight" in name
