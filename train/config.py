"""Model configuration: one dataclass for every architecture, size presets, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

WKV_BACKENDS = ("auto", "cuda", "cpu", "reference")
ARCHS = ("rwkv4", "rwkv5", "rwkv6", "rwkv7", "rrwkv")

# Size presets. The plain names follow the RWKV-4 Pile models (BlinkDL/rwkv-4-pile-*):
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
# RWKV-7 (x070) sizes as the released Goose models: World tokenizer (65536), ctx 4096, head size 64;
# LoRA widths follow from n_embd (see ModelConfig.__post_init__).
_RWKV7 = {"arch": "rwkv7", "vocab_size": 65536, "ctx_len": 4096}
PRESETS.update(
    {
        "rwkv7-tiny": {**_RWKV7, "n_layer": 4, "n_embd": 128, "ctx_len": 256},
        "rwkv7-0.1b": {**_RWKV7, "n_layer": 12, "n_embd": 768},
        "rwkv7-0.4b": {**_RWKV7, "n_layer": 24, "n_embd": 1024},
        "rwkv7-1.5b": {**_RWKV7, "n_layer": 24, "n_embd": 2048},
        "rwkv7-2.9b": {**_RWKV7, "n_layer": 32, "n_embd": 2560},
        "rwkv7-7.2b": {**_RWKV7, "n_layer": 32, "n_embd": 4096},
        "rwkv7-13.3b": {**_RWKV7, "n_layer": 61, "n_embd": 4096},
    }
)
# RRWKV (RWKV-4 with mediums, train/models/rrwkv.py): RWKV-4's tiny sizes.
PRESETS["rrwkv-tiny"] = {"arch": "rrwkv", "n_layer": 4, "n_embd": 128, "ctx_len": 256}

# RWKV-5 (x052, Eagle) and RWKV-6 (x060, Finch) as the released World models: World tokenizer (65536),
# ctx 4096, head size 64, dim_ffn 3.5 n_embd (rounded down to a multiple of 32).
_RWKV5 = {"arch": "rwkv5", "vocab_size": 65536, "ctx_len": 4096}
_RWKV6 = {**_RWKV5, "arch": "rwkv6"}
PRESETS.update(
    {
        "rwkv5-tiny": {**_RWKV5, "n_layer": 4, "n_embd": 128, "ctx_len": 256},
        "rwkv5-0.4b": {**_RWKV5, "n_layer": 24, "n_embd": 1024},
        "rwkv5-1.5b": {**_RWKV5, "n_layer": 24, "n_embd": 2048},
        "rwkv5-3b": {**_RWKV5, "n_layer": 32, "n_embd": 2560},
        "rwkv5-7b": {**_RWKV5, "n_layer": 32, "n_embd": 4096},
        "rwkv6-tiny": {**_RWKV6, "n_layer": 4, "n_embd": 128, "ctx_len": 256},
        "rwkv6-1.6b": {**_RWKV6, "n_layer": 24, "n_embd": 2048},
        "rwkv6-3b": {**_RWKV6, "n_layer": 32, "n_embd": 2560},
        "rwkv6-7b": {**_RWKV6, "n_layer": 32, "n_embd": 4096},
        "rwkv6-14b": {**_RWKV6, "n_layer": 61, "n_embd": 4096},
    }
)

# Fields that are settings of a run, not shapes of the weights: a resume may change them.
RUNTIME_FIELDS = ("preset", "grad_cp", "wkv_backend", "wkv_chunk_len", "ctx_len")



# RWKV-7 LoRA widths of the released x070 checkpoints: factor * n_embd ** power, rounded to a
# multiple of 32, at least 32 (w, a: 1.8 sqrt(C); v: 1.3 sqrt(C); g: 0.6 C^0.8).
_RWKV7_LORA = (
    ("dim_w_lora", 1.8, 0.5), ("dim_a_lora", 1.8, 0.5), ("dim_v_lora", 1.3, 0.5), ("dim_g_lora", 0.6, 0.8)
)


def rwkv7_lora_width(n_embd: int, factor: float, power: float) -> int:
    """factor * n_embd ** power rounded to the nearest multiple of 32, at least 32."""
    return max(32, int(round(factor * n_embd**power / 32)) * 32)


def rwkv6_lora_widths(n_embd: int) -> tuple[int, int]:
    """RWKV-6 (x060) LoRA widths of the released models: token-shift mix 32 and decay 64, doubled
    from n_embd 4096 (RWKV-LM's TIME_MIX_EXTRA_DIM / TIME_DECAY_EXTRA_DIM)."""
    return (64, 128) if n_embd >= 4096 else (32, 64)


@dataclass
class ModelConfig:
    """Sizes of an RWKV model. `dim_att`/`dim_ffn` default to n_embd / 4*n_embd as in RWKV-LM.

    `arch` picks the generation (rwkv4, rwkv5, rwkv6, rwkv7); `head_size` is RWKV-5/6/7's, the
    `dim_{w,a,v,g}_lora` widths RWKV-7's (0: the width the released x070 checkpoints use for this n_embd,
    see `rwkv7_lora_width`), `dim_mix_lora`/`dim_decay_lora` RWKV-6's (0: `rwkv6_lora_widths`); the
    widths of other generations stay 0. dim_ffn defaults to 3.5 n_embd for RWKV-5/6.
    """

    n_layer: int
    n_embd: int
    arch: str = "rwkv4"
    vocab_size: int = 50277
    ctx_len: int = 1024  # context length the model is trained at (recorded; HF context_length, scoring)
    dim_att: int = 0  # 0 -> n_embd
    dim_ffn: int = 0  # 0 -> 4 * n_embd
    layer_norm_eps: float = 1e-5
    head_size: int = 64
    dim_w_lora: int = 0  # decay
    dim_a_lora: int = 0  # in-context learning rate
    dim_v_lora: int = 0  # value residual
    dim_g_lora: int = 0  # output gate
    dim_mix_lora: int = 0  # RWKV-6 data-dependent token shift (0: rwkv6_lora_widths)
    dim_decay_lora: int = 0  # RWKV-6 data-dependent decay (0: rwkv6_lora_widths)
    grad_cp: bool = False  # gradient checkpointing per block
    wkv_backend: str = "auto"  # auto | cuda | cpu | reference
    # WKV kernel calls of at most this many steps, the state carried between them (0: one call per
    # window). Not a model shape: it bounds the CUDA backward's scratch (8 bytes per batch x step x
    # channel) and may change on resume.
    wkv_chunk_len: int = 0
    medium_every: int = 32  # RRWKV: a medium after every this many tokens (unused by other archs)
    # RRWKV: how a span is compressed: "softmax" (learned per-channel pooling) or "last" (its last token)
    medium_pool: str = "softmax"
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        for lora, factor, power in _RWKV7_LORA if self.arch == "rwkv7" else ():
            if getattr(self, lora) == 0:
                setattr(self, lora, rwkv7_lora_width(self.n_embd, factor, power))
        if self.dim_att == 0:
            self.dim_att = self.n_embd
        if self.arch == "rwkv6":
            mix, decay = rwkv6_lora_widths(self.n_embd)
            self.dim_mix_lora = self.dim_mix_lora or mix
            self.dim_decay_lora = self.dim_decay_lora or decay
        if self.dim_ffn == 0:
            # RWKV-LM v5 train.py (x052, x060): int(n_embd * 3.5) // 32 * 32
            wide = self.arch in ("rwkv5", "rwkv6")
            self.dim_ffn = int(self.n_embd * 3.5) // 32 * 32 if wide else 4 * self.n_embd
        positive = ("n_layer", "n_embd", "vocab_size", "ctx_len", "dim_att", "dim_ffn", "head_size",
                    "medium_every")
        if self.arch == "rwkv7":
            positive += tuple(lora for lora, _, _ in _RWKV7_LORA)
        if self.arch == "rwkv6":
            positive += ("dim_mix_lora", "dim_decay_lora")
        for name in positive:
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
            # The time_mix vectors and residual stream assume dim_att == n_embd (as RWKV-LM does).
            raise ValueError(
                f"ModelConfig.dim_att ({self.dim_att}) must equal n_embd ({self.n_embd})"
            )
        if self.arch in ("rwkv5", "rwkv6", "rwkv7") and self.dim_att % self.head_size:
            raise ValueError(
                f"ModelConfig.dim_att ({self.dim_att}) must be a multiple of head_size ({self.head_size})"
            )
        if self.medium_pool not in ("softmax", "last"):
            raise ValueError(f"ModelConfig.medium_pool must be 'softmax' or 'last', got {self.medium_pool!r}")
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
        """Parameter count of the model (the architecture's formula; see train/models/)."""
        return self._architecture().n_params(self)

    def matmul_params(self) -> int:
        """Parameters used in a matrix multiply per token (all but the embedding lookup and vectors)."""
        return self._architecture().matmul_params(self)

    def flops_per_token(self, ctx_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward).

        6 * matmul_params (2 per multiply-add forward, 4 backward) plus the WKV recurrence's own count.
        RWKV is linear in sequence length, so, unlike attention, the per-token cost does not depend on
        ctx_len (kept for a uniform API).
        """
        del ctx_len
        return 6.0 * self.matmul_params() + self._architecture().wkv_flops_per_token(self)

    def _architecture(self):
        from train.models import architecture  # the model modules import this one

        return architecture(self.arch)
