"""Model configuration for RWKV-4: one dataclass, named size presets, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

WKV_BACKENDS = ("auto", "cuda", "cpu", "reference")

# Size presets. The named sizes follow the RWKV-4 Pile models (BlinkDL/rwkv-4-pile-*):
# layers x width, vocabulary of the GPT-NeoX 20B tokenizer (50277), ctx 1024.
# `tiny` is small enough for 2-process DeepSpeed tests and the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 4, "n_embd": 128, "ctx_len": 256},
    "169m": {"n_layer": 12, "n_embd": 768, "ctx_len": 1024},
    "430m": {"n_layer": 24, "n_embd": 1024, "ctx_len": 1024},
    "1b5": {"n_layer": 24, "n_embd": 2048, "ctx_len": 1024},
    "3b": {"n_layer": 32, "n_embd": 2560, "ctx_len": 1024},
    "7b": {"n_layer": 32, "n_embd": 4096, "ctx_len": 1024},
    "14b": {"n_layer": 40, "n_embd": 5120, "ctx_len": 1024},
}

# Fields that are settings of a run, not shapes of the weights: a resume may change them.
RUNTIME_FIELDS = ("preset", "grad_cp", "wkv_backend", "wkv_chunk_len", "ctx_len")

# WKV cost per (token, channel): the forward recurrence (two exps, a max, four multiply-adds,
# a division; see cuda/ header) counted as ~10 FLOPs, its backward as twice that.
WKV_FLOPS_FWD_PER_CHANNEL = 10
WKV_FLOPS_FWD_BWD_PER_CHANNEL = 3 * WKV_FLOPS_FWD_PER_CHANNEL


@dataclass
class ModelConfig:
    """Sizes of an RWKV-4 model. `dim_att`/`dim_ffn` default to n_embd / 4*n_embd as in RWKV-LM v4neo."""

    n_layer: int
    n_embd: int
    vocab_size: int = 50277
    ctx_len: int = 1024  # context length the model is trained at (recorded; HF context_length, scoring)
    dim_att: int = 0  # 0 -> n_embd
    dim_ffn: int = 0  # 0 -> 4 * n_embd
    layer_norm_eps: float = 1e-5
    grad_cp: bool = False  # gradient checkpointing per block
    wkv_backend: str = "auto"  # auto | cuda | cpu | reference
    # WKV kernel calls of at most this many steps, the state carried between them (0: one call per
    # window). Not a model shape: it bounds the CUDA backward's scratch (8 bytes per batch x step x
    # channel) and may change on resume.
    wkv_chunk_len: int = 0
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dim_att == 0:
            self.dim_att = self.n_embd
        if self.dim_ffn == 0:
            self.dim_ffn = 4 * self.n_embd
        for name in ("n_layer", "n_embd", "vocab_size", "ctx_len", "dim_att", "dim_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        chunk = self.wkv_chunk_len
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ValueError(
                f"ModelConfig.wkv_chunk_len must be a non-negative integer (0: no chunking), "
                f"got {self.wkv_chunk_len!r}"
            )
        if self.dim_att != self.n_embd:
            # RWKV-4's time_mix and residual stream assume dim_att == n_embd (as RWKV-LM's v4 does).
            raise ValueError(
                f"ModelConfig.dim_att ({self.dim_att}) must equal n_embd ({self.n_embd}) for RWKV-4"
            )
        if self.wkv_backend not in WKV_BACKENDS:
            raise ValueError(
                f"ModelConfig.wkv_backend must be one of {WKV_BACKENDS}, got {self.wkv_backend!r}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available presets: {', '.join(PRESETS)}")
        values = {**PRESETS[key], "preset": key}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {sorted(unknown)} in overrides for preset {name!r}"
            )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def shape_changes(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{field: (saved, now)} for the fields that shape the weights and differ from a saved config.

        Run settings (RUNTIME_FIELDS: the kernel's chunk length, checkpointing, backend, the recorded
        context length) may change on resume; fields a checkpoint predates are not compared.
        """
        return {
            k: (saved[k], v)
            for k, v in self.to_dict().items()
            if k not in RUNTIME_FIELDS and k in saved and saved[k] != v
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)

    def n_params(self) -> int:
        """Parameter count: 2VD + 13D^2 L + D(11L + 4) for dim_att = D, dim_ffn = 4D.

        Per layer: 4 D x D in time mixing, D x 4D + 4D x D + D x D in channel mixing (13 D^2);
        ln1, ln2 (4D), time_decay, time_first, 3 time_mix (5D), 2 channel time_mix (2D) = 11D.
        Once: ln0 and ln_out (4D), embedding and untied head (2VD).
        """
        D, L, V, F = self.n_embd, self.n_layer, self.vocab_size, self.dim_ffn
        per_layer = 4 * D * D + 2 * D * F + D * D + 11 * D
        return 2 * V * D + L * per_layer + 4 * D

    def matmul_params(self) -> int:
        """Parameters used in a matrix multiply per token (all but the embedding lookup and vectors)."""
        D, L, V, F = self.n_embd, self.n_layer, self.vocab_size, self.dim_ffn
        return L * (5 * D * D + 2 * D * F) + V * D

    def flops_per_token(self, ctx_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward).

        6 * matmul_params (2 per multiply-add forward, 4 backward) plus the WKV recurrence,
        WKV_FLOPS_FWD_BWD_PER_CHANNEL * dim_att * n_layer. RWKV is linear in sequence length, so,
        unlike attention, the per-token cost does not depend on ctx_len (kept for a uniform API).
        """
        del ctx_len
        return 6.0 * self.matmul_params() + WKV_FLOPS_FWD_BWD_PER_CHANNEL * self.dim_att * self.n_layer
