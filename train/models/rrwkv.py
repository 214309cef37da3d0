"""RRWKV: RWKV-4 with retrospective "mediums" (Retrospected Receptance Weighted Key Value, arXiv 2306.05176).

Every `medium_every` (M) tokens a *medium* is inserted: a learned summary of the span of M tokens it
follows together with the previous medium. Per layer (docs/rrwkv.md has the equations):

- compress: the span's time-mix inputs (ln1 outputs) pooled by a per-channel softmax over the span
  (scores from `att.medium_score`), then merged with the previous mediums by a normalised decaying
  average, `m_j = sum_{i<=j} a^(j-i) s_i / sum_{i<=j} a^(j-i)` per channel, computed by the WKV-4 op
  itself (k = 0, u = -w);
- insert: the medium's key/value (the layer's own projections of m_j plus a learned key bonus) is
  interleaved into the sequence the WKV runs over, right after its span, so later tokens read it
  from the WKV state; its WKV output is dropped (a medium has no logit and no loss);
- activate: every token's time-mix and channel-mix inputs get an extra mix towards the latest
  medium whose span is complete before the token (`time_mix_m*`), a path of length one from the
  compressed past to the token.

The WKV kernel is RWKV-4's, unchanged (CUDA and its CPU twin): training stays parallel and linear
in T (T + T/M WKV steps, T/M medium steps). Modes:

- parallel (`model(idx)`), for training;
- RNN (`model.forward_rnn(tokens, state)`): token by token with a constant-size state (running sums
  for the span being pooled and for the medium recurrence; no buffer grows);
- parallel from a state (`forward_with_state`): from a state at a span boundary (position a multiple
  of M), as segmented training carries it between segments of a multiple of M tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from train.config import ModelConfig
from train.model import RWKV, token_shift
from train.models import rwkv4
from train.wkv import wkv_state

# RNN state layout per layer: RWKV-4's five slots, then the latest medium, the medium recurrence's
# (aa, bb, pp), the running softmax pool of the current span (numerator, denominator, max score), and
# the number of tokens seen (every channel holds it; a float is exact up to 2^24 tokens in fp32).
(STATE_ATT_X, STATE_AA, STATE_BB, STATE_PP, STATE_FFN_X, STATE_MED, STATE_MED_AA, STATE_MED_BB,
 STATE_MED_PP, STATE_SPAN_NUM, STATE_SPAN_DEN, STATE_SPAN_MAX, STATE_POS) = range(13)
STATE_SLOTS = 13
PP_INIT = rwkv4.PP_INIT


def _wkv_step(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aa: torch.Tensor,
              bb: torch.Tensor, pp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One WKV-4 step in the rwkv package's stable form (w = -exp(time_decay)): y and the new aa, bb, pp."""
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return y, e1 * aa + e2 * v, e1 * bb + e2, p


class TimeMix(rwkv4.TimeMix):
    """RWKV-4 time mixing over tokens and interleaved mediums, plus the compression of each span."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        C = cfg.n_embd
        self.time_mix_mk = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_mv = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_mr = nn.Parameter(torch.empty(1, 1, C))
        self.medium_decay = nn.Parameter(torch.empty(C))  # a = exp(-exp(medium_decay)) per channel
        self.medium_first = nn.Parameter(torch.empty(C))  # key bonus of a medium's slot in the WKV
        self.medium_score = nn.Linear(C, C, bias=False)  # pooling scores of a span (per channel)

    def _kvr_m(self, x: torch.Tensor, xx: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dx, dm = x - xx, m - x
        k = self.key(rwkv4._mix(xx, dx, self.time_mix_k) + dm * self.time_mix_mk)
        v = self.value(rwkv4._mix(xx, dx, self.time_mix_v) + dm * self.time_mix_mv)
        r = self.receptance(rwkv4._mix(xx, dx, self.time_mix_r) + dm * self.time_mix_mr)
        return k, v, r

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) ln1 outputs from a state s (STATE_SLOTS, B, C) at a span boundary -> (output,
        per-token latest medium (B, T, C) for the channel mix, this module's part of the new state)."""
        B, T, C = x.shape
        M = self.cfg.medium_every
        n = T // M
        cfg = self.cfg
        # compress: softmax pool of each complete span, then the medium recurrence (the WKV op, k = 0)
        spans = x[:, : n * M].reshape(B, n, M, C)
        last = cfg.medium_pool == "last"
        pooled = spans[:, :, -1] if last else (torch.softmax(self.medium_score(spans), dim=2) * spans).sum(2)
        med_decay = self.medium_decay
        mediums, med_s = wkv_state(med_decay, torch.exp(med_decay), torch.zeros_like(pooled), pooled,
                                   s[STATE_MED_AA : STATE_MED_PP + 1], backend=cfg.wkv_backend)
        mediums = mediums.to(x.dtype)
        # activate: token t of span j sees medium j-1 (the carried one for j = 0), never its own span's
        latest = torch.cat([s[STATE_MED].unsqueeze(1).to(x.dtype), mediums], dim=1)
        m_tok = latest.repeat_interleave(M, dim=1)[:, :T]
        k, v, r = self._kvr_m(x, token_shift(x, s[STATE_ATT_X]), m_tok)
        # insert: each medium's key/value right after its span in the WKV's sequence
        k_ext = _interleave(k, self.key(mediums) + self.medium_first, M)
        v_ext = _interleave(v, self.value(mediums), M)
        y_ext, wkv_s = wkv_state(self.time_decay, self.time_first, k_ext, v_ext, s[STATE_AA : STATE_PP + 1],
                                 backend=cfg.wkv_backend, chunk_len=cfg.wkv_chunk_len)
        y = _drop_mediums(y_ext, M, T)
        out = self.output(torch.sigmoid(r) * y.to(r.dtype))
        # the open span's running pool (empty when T is a multiple of M)
        tail = x[:, n * M :]
        if tail.shape[1] and last:  # the pool of a span so far is its latest token (weight e^0 / 1)
            num, den, smax = tail[:, -1], torch.ones_like(tail[:, -1]), torch.zeros_like(tail[:, -1])
        elif tail.shape[1]:
            score = self.medium_score(tail)
            smax = score.max(1).values
            e = torch.exp(score - smax.unsqueeze(1))
            num, den = (e * tail).sum(1), e.sum(1)
        else:
            num, den, smax = torch.zeros_like(s[0]), torch.zeros_like(s[0]), torch.full_like(s[0], PP_INIT)
        dt = s.dtype
        new_s = torch.stack([x[:, -1].to(dt), *wkv_s.to(dt).unbind(0), s[STATE_FFN_X], latest[:, -1].to(dt),
                             *med_s.to(dt).unbind(0), num.to(dt), den.to(dt), smax.to(dt), s[STATE_POS] + T])
        return out, m_tok, new_s

    def step(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: x (B, 1, C) ln1 output, s (STATE_SLOTS, B, C) -> (output (B, 1, C), new state; the
        medium of a span completed by this token is already in it, the channel mix reads the old one)."""
        k, v, r = self._kvr_m(x, s[STATE_ATT_X, :, None].to(x.dtype), s[STATE_MED, :, None].to(x.dtype))
        k, v, x1 = k[:, 0], v[:, 0], x[:, 0]
        cdt = s.dtype
        w, u = -torch.exp(self.time_decay.to(cdt)), self.time_first.to(cdt)
        y, aa, bb, pp = _wkv_step(w, u, k.to(cdt), v.to(cdt), s[STATE_AA], s[STATE_BB], s[STATE_PP])
        out = self.output(torch.sigmoid(r) * y[:, None].to(r.dtype))
        # the open span's pool, online softmax (running max keeps the exponentials finite)
        if self.cfg.medium_pool == "last":
            num, den, smax = x1.to(cdt), torch.ones_like(x1, dtype=cdt), torch.zeros_like(x1, dtype=cdt)
        else:
            score = self.medium_score(x1).to(cdt)
            smax = torch.maximum(s[STATE_SPAN_MAX], score)
            e_old, e_new = torch.exp(s[STATE_SPAN_MAX] - smax), torch.exp(score - smax)
            num = e_old * s[STATE_SPAN_NUM] + e_new * x1.to(cdt)
            den = e_old * s[STATE_SPAN_DEN] + e_new
        med, med_aa, med_bb, med_pp = s[STATE_MED], s[STATE_MED_AA], s[STATE_MED_BB], s[STATE_MED_PP]
        pos = s[STATE_POS] + 1
        done = int(pos[0, 0].item()) % self.cfg.medium_every == 0  # the same position in every row
        if done:
            wm = -torch.exp(self.medium_decay.to(cdt))
            med, med_aa, med_bb, med_pp = _wkv_step(wm, -wm, torch.zeros_like(num), num / den,
                                                    med_aa, med_bb, med_pp)
            km = (self.key(med.to(x.dtype)) + self.medium_first).to(cdt)
            _, aa, bb, pp = _wkv_step(w, u, km, self.value(med.to(x.dtype)).to(cdt), aa, bb, pp)
            num, den, smax = torch.zeros_like(num), torch.zeros_like(den), torch.full_like(smax, PP_INIT)
        new_s = torch.stack([x1.to(cdt), aa, bb, pp, s[STATE_FFN_X], med, med_aa, med_bb, med_pp,
                             num, den, smax, pos])
        return out, new_s


def _interleave(tok: torch.Tensor, med: torch.Tensor, M: int) -> torch.Tensor:
    """(B, T, C) tokens and (B, T // M, C) mediums -> (B, T + T // M, C), medium j after token (j+1)M-1."""
    B, T, C = tok.shape
    n = med.shape[1]
    body = torch.cat([tok[:, : n * M].reshape(B, n, M, C), med.unsqueeze(2).to(tok.dtype)], dim=2)
    return torch.cat([body.reshape(B, n * (M + 1), C), tok[:, n * M :]], dim=1)


def _drop_mediums(y: torch.Tensor, M: int, T: int) -> torch.Tensor:
    """The tokens' rows of an interleaved (B, T + T // M, C) sequence."""
    B, _, C = y.shape
    n = T // M
    body = y[:, : n * (M + 1)].reshape(B, n, M + 1, C)[:, :, :M].reshape(B, n * M, C)
    return torch.cat([body, y[:, n * (M + 1) :]], dim=1)


class ChannelMix(rwkv4.ChannelMix):
    """RWKV-4 channel mixing with an extra mix towards the latest medium."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.time_mix_mk = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.time_mix_mr = nn.Parameter(torch.empty(1, 1, cfg.n_embd))

    def forward(self, x: torch.Tensor, xx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dx, dm = x - xx, m - x
        k = torch.square(torch.relu(self.key(rwkv4._mix(xx, dx, self.time_mix_k) + dm * self.time_mix_mk)))
        r = self.receptance(rwkv4._mix(xx, dx, self.time_mix_r) + dm * self.time_mix_mr)
        return torch.sigmoid(r) * self.value(k)


class Block(nn.Module):
    """Pre-LN residual block as RWKV-4's; the time mix hands the channel mix each token's medium."""

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

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) from this layer's state s (STATE_SLOTS, B, C) -> (x, state after the last token)
        (submodules are called, not their methods: ZeRO-3 gathers on call)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att_out, m_tok, new_s = self.att(self.ln1(x), s)
        x = x + att_out
        xf = self.ln2(x)
        x = x + self.ffn(xf, token_shift(xf, s[STATE_FFN_X]), m_tok)
        ffn_x = xf[:, -1:].transpose(0, 1).to(s.dtype)
        return x, torch.cat([new_s[:STATE_FFN_X], ffn_x, new_s[STATE_FFN_X + 1 :]])

    def forward_rnn(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token x (B, 1, C) -> (x, new state)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        m_old = s[STATE_MED, :, None].to(x.dtype)
        att_out, new_s = self.att.step(self.ln1(x), s)
        x = x + att_out
        xf = self.ln2(x)
        x = x + self.ffn(xf, s[STATE_FFN_X, :, None].to(x.dtype), m_old)
        return x, torch.cat([new_s[:STATE_FFN_X], xf.transpose(0, 1).to(s.dtype), new_s[STATE_FFN_X + 1 :]])


class Model(RWKV):
    """RRWKV language model. `model(idx) -> logits`; `model.forward_rnn(tokens, state)` for inference."""

    Block = Block

    def _init_value(self, name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
        """RWKV-4's initialisation (rwkv4.Model._init_value) for every RWKV-4 parameter; the medium's:
          time_mix_m* = 0.1 (a small pull towards the medium that training can grow),
          medium_decay[c] = log(-log a_c), a_c from 0.5 to 0.99 over the channels (spans remembered
            for about 1 to 100 mediums),
          medium_first = 0,
          medium_score = 0 (each span starts as its plain mean).
        """
        parts = name.split(".")
        if name.startswith("blocks.") and parts[3].startswith("time_mix_m"):
            return p.new_full(tuple(p.shape), 0.1, dtype=torch.float32)
        if name.endswith("att.medium_decay"):
            a = np.linspace(0.5, 0.99, p.shape[0])
            return torch.from_numpy(np.log(-np.log(a)).astype(np.float32)).to(p.device)
        if name.endswith("att.medium_first") or name.endswith("att.medium_score.weight"):
            return p.new_zeros(tuple(p.shape), dtype=torch.float32)
        return rwkv4.Model._init_value(self, name, p, seed)

    # ----------------------------------------------------------------------------- parallel mode
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size) (tokens only: mediums have none)."""
        fp64 = self.emb.weight.dtype == torch.float64
        state = self.init_state(idx.shape[0], idx.device, torch.float64 if fp64 else torch.float32)
        return self._parallel(idx, state)[0]

    def forward_with_state(
        self, idx: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) after `state` (None: a fresh one) -> logits (B, T, V) and the state after the last
        token, (n_layer, STATE_SLOTS, B, n_embd). The state must be at a span boundary (its position a
        multiple of medium_every), so segments of a multiple of medium_every tokens chain; a state in
        the middle of a span is refused (feed such tokens through forward_rnn)."""
        B = idx.shape[0]
        if state is None:
            fp64 = self.emb.weight.dtype == torch.float64
            state = self.init_state(B, idx.device, torch.float64 if fp64 else torch.float32)
        expected = (self.cfg.n_layer, STATE_SLOTS, B, self.cfg.n_embd)
        if tuple(state.shape) != expected:
            raise ValueError(f"forward_with_state: state has shape {tuple(state.shape)}, expected {expected}")
        pos = int(state[0, STATE_POS, 0, 0].item())
        if pos % self.cfg.medium_every:
            raise ValueError(
                f"rrwkv forward_with_state: the state is at position {pos}, inside a span of "
                f"medium_every={self.cfg.medium_every} tokens; the parallel mode starts at span boundaries "
                "(use segments of a multiple of medium_every tokens, or forward_rnn)"
            )
        return self._parallel(idx, state)

    def _parallel(self, idx: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._logits_with_stacked_state(idx, state)

    # ----------------------------------------------------------------------------- RNN mode
    def init_state(
        self,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Fresh RNN state, shape (n_layer, STATE_SLOTS, [batch_size,] n_embd); fp32 unless dtype says."""
        device = device if device is not None else self.emb.weight.device
        shape = ((self.cfg.n_layer, STATE_SLOTS) + ((batch_size,) if batch_size is not None else ())
                 + (self.cfg.n_embd,))
        state = torch.zeros(shape, dtype=dtype or torch.float32, device=device)
        state[:, [STATE_PP, STATE_MED_PP, STATE_SPAN_MAX]] = PP_INIT
        return state

    def forward_rnn(
        self, tokens: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed tokens (T,) or (B, T) after `state`, one at a time; return the last token's logits
        ((V,) or (B, V)) and the new state. The input state is not modified."""
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
        for t in range(tokens.shape[1]):
            x = self.emb(tokens[:, t : t + 1])
            new_states = []
            for i, block in enumerate(self.blocks):
                x, s = block.forward_rnn(x, state[i])
                new_states.append(s)
            state = torch.stack(new_states)
        logits = self.head(self.ln_out(x[:, 0]))
        if unbatched:
            return logits.squeeze(0), state.squeeze(2)
        return logits, state


# ------------------------------------------------------------------------------- what the pipeline asks
def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """ModelConfig fields recovered from a state dict's tensor shapes (medium_every is not a shape: the
    .json sidecar records it, else the default)."""
    cfg = rwkv4.config_from_shapes(shapes)
    cfg["arch"] = "rrwkv"
    return cfg


def _extra_per_layer(cfg: ModelConfig) -> tuple[int, int]:
    """(matrix, vector) parameters RRWKV adds to a RWKV-4 layer: medium_score (D x D); 3 + 2 medium
    mixes, medium_decay, medium_first (7D)."""
    D = cfg.n_embd
    return D * D, 7 * D


def n_params(cfg: ModelConfig) -> int:
    """RWKV-4's count plus, per layer, D^2 + 7D (see _extra_per_layer)."""
    mat, vec = _extra_per_layer(cfg)
    return rwkv4.n_params(cfg) + cfg.n_layer * (mat + vec)


def matmul_params(cfg: ModelConfig) -> int:
    """Per token: RWKV-4's, plus the pooling scores (D^2), plus each medium's key and value projections
    (2 D^2 once per medium_every tokens)."""
    D, L, M = cfg.n_embd, cfg.n_layer, cfg.medium_every
    return rwkv4.matmul_params(cfg) + L * (D * D + math.ceil(2 * D * D / M))


def wkv_flops_per_token(cfg: ModelConfig) -> float:
    """RWKV-4's WKV over T + T/M steps, plus the medium recurrence (T/M steps)."""
    return rwkv4.wkv_flops_per_token(cfg) * (1 + 2 / cfg.medium_every)


def activation_values_per_layer(cfg: ModelConfig) -> int:
    """RWKV-4's ~30 n_embd, plus the per-token medium, its three extra mixes in time mixing and two
    in channel mixing, and the pooling scores and weights: about 38 n_embd."""
    return 38 * cfg.n_embd


def wkv_scratch_bytes(cfg: ModelConfig, ctx_len: int, micro_batch: int) -> int:
    """RWKV-4's scratch for the interleaved sequence of ctx_len + ctx_len / M steps."""
    return rwkv4.wkv_scratch_bytes(cfg, ctx_len + ctx_len // cfg.medium_every, micro_batch)


ADAM_EPS = rwkv4.ADAM_EPS


def lr_scale(name: str, layerwise_lr: bool) -> float:
    """RWKV-4's (time_decay 2x, time_first 3x); medium_decay and medium_first follow time_decay and
    time_first."""
    if layerwise_lr and "medium_decay" in name:
        return 2.0
    if layerwise_lr and "medium_first" in name:
        return 3.0
    return rwkv4.lr_scale(name, layerwise_lr)


decays = rwkv4.decays
